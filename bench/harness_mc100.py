"""The embedded SmolLM2's multiple-choice scores by log-likelihood through lm-evaluation-harness
(``closedloop.harness``), to check against shared/ASSETS.md (100 items: ARC-C 0.32, SciQ 0.75,
CSQA 0.28). Not a speed goal: a correctness check of the harness wiring.

    python bench/harness_mc100.py OUT_DIR [bfloat16|float32] [arc_challenge,sciq,csqa] [shuffled|first100]

``shuffled``: the 100 held-out rows the pipeline evaluates (seeded shuffle, ``seed`` 0);
``first100``: the first 100 rows of the validation file, in file order.
"""

import json
import sys
import time

from closedloop import artifacts, config, evaluation, models, paths, tasks


def main() -> None:
    out = sys.argv[1]
    dtype = sys.argv[2] if len(sys.argv) > 2 else "bfloat16"
    names = (sys.argv[3] if len(sys.argv) > 3 else "arc_challenge,sciq,csqa").split(",")
    order = sys.argv[4] if len(sys.argv) > 4 else "shuffled"
    cfg = config.load([], [f"data_dir={out}/data", f"results_dir={out}/results", "data.tasks.csqa.n_heldout=100",
                           f"model.inference_dtype={dtype}"])
    model, tokenizer = models.load_dir(models.base_source(cfg.model), cfg.model, inference=True)
    for name in names:
        if order == "first100":
            rows = tasks.BENCHMARKS[name]()[:100]
        else:
            rows = tasks.build_splits(name, cfg.data.tasks[name], cfg.seed)["heldout"][:100]
        folder = paths.data_dir(cfg, name)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "heldout.jsonl", "w") as fh:
            artifacts.write_jsonl(fh, rows)
        start = time.time()
        _, m = evaluation.run_harness(model, tokenizer, cfg, name, cfg.eval, rows, "loglikelihood")
        print(json.dumps({"task": name, "order": order, "dtype": dtype, "n": m["n"], "acc": m["accuracy"],
                          "ci": [m["ci_low"], m["ci_high"]], "acc_norm": m.get("acc_norm", {}).get("accuracy"),
                          "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
