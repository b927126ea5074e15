"""The training engine on DeepSpeed: config and engine set-up (deepspeed_setup), the loop (loop),
checkpoints and resume (checkpoint), preemption signals (signals), sharded evaluation (evaluate),
and the shared body of the two entry points (run)."""
