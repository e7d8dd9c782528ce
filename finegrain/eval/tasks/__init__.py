"""One file per evaluation task (``finegrain.eval.task.EvalTask`` + ``register_task``); every
module here is imported when the evaluation-task registry is first read (``finegrain.eval``)."""
