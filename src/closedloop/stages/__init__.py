"""Stage entry modules, one per stage of :data:`closedloop.stage_table.STAGES`: each reads its
inputs, calls library code and writes one artifact. Only the stage table names them."""
