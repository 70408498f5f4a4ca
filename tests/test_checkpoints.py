"""Resumable training pieces: which checkpoint counts as complete, the running train log."""

from types import SimpleNamespace

from closedloop import artifacts, checkpoints


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    assert checkpoints.latest(tmp_path) is None and checkpoints.step_of(None) == 0
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):  # 6, 10: killed while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / checkpoints.STATE).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-8").mkdir()  # killed while writing the state (seen in CI): empty, then cut
    (tmp_path / "checkpoint-8" / checkpoints.STATE).write_text("")
    assert checkpoints.latest(tmp_path).name == "checkpoint-4"
    (tmp_path / "checkpoint-8" / checkpoints.STATE).write_text('{"global_step": 8, "log_hi')
    assert checkpoints.latest(tmp_path).name == "checkpoint-4" and checkpoints.step_of(checkpoints.latest(tmp_path)) == 4


def test_work_dir_is_keyed_by_the_config_view_and_the_input_records(tmp_path):
    data = tmp_path / "data"
    with artifacts.artifact_dir(data, "data", {"seed": 0}, {}, 0) as out:
        (out / "train.jsonl").write_text("{}\n")
    a = checkpoints.work_dir(tmp_path / "sft", {"sft": {"learning_rate": 1e-4}}, {"data": data})
    b = checkpoints.work_dir(tmp_path / "sft", {"sft": {"learning_rate": 3e-5}}, {"data": data})
    assert a.parent == tmp_path / ".work" and a.name.startswith("sft-") and a != b
    a.mkdir(parents=True)
    assert checkpoints.work_dir(tmp_path / "sft", {"sft": {"learning_rate": 1e-4}}, {"data": data}) == a
    with artifacts.artifact_dir(data, "data", {"seed": 0}, {}, 0) as out:  # produced again, other rows
        (out / "train.jsonl").write_text("{}\n{}\n")
    c = checkpoints.work_dir(tmp_path / "sft", {"sft": {"learning_rate": 1e-4}}, {"data": data})
    assert c != a and not a.exists()  # another input record: the old resume state is gone


def test_train_log_keeps_rows_up_to_the_resumed_step(tmp_path, monkeypatch):
    log = tmp_path / "train_log.csv"
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    first = checkpoints.CsvLogCallback(log)
    for step in (1, 2, 3, 4, 5):  # killed after step 5, last checkpoint at step 4
        state.global_step = step
        first.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 0.1})
    second = checkpoints.CsvLogCallback(log, resume_step=4)
    for step in (5, 6):
        state.global_step = step
        second.on_log(None, state, None, logs={"loss": 0.5, "learning_rate": 0.1})
    rows = log.read_text().splitlines()
    assert rows[0] == "step,loss,lr,reward_margin,reward_accuracy"
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    assert rows[1] == "1,1.0,0.1,," and rows[-1] == "6,0.5,0.1,,"  # an SFT log: no rewards
    monkeypatch.setenv("RANK", "1")  # another rank of a DDP job neither truncates nor writes
    checkpoints.CsvLogCallback(log)
    state.is_world_process_zero = False
    second.on_log(None, state, None, logs={"loss": 9.0})
    assert log.read_text().splitlines() == rows


def test_train_log_keeps_trl_dpo_reward_margin_and_accuracy(tmp_path):
    """TRL's DPOTrainer logs rewards/margins and rewards/accuracies beside the loss; the log keeps them."""
    log = tmp_path / "train_log.csv"
    callback = checkpoints.CsvLogCallback(log)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    callback.on_log(None, state, None, logs={"loss": 0.69, "learning_rate": 5e-6, "rewards/margins": 0.012,
                                             "rewards/accuracies": 0.75, "rewards/chosen": 0.01})
    callback.on_log(None, state, None, logs={"train_runtime": 1.0})  # the end-of-training summary: no row
    assert log.read_text().splitlines() == ["step,loss,lr,reward_margin,reward_accuracy", "3,0.69,5e-06,0.012,0.75"]
