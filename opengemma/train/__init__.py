"""Training: one loop (:mod:`.loop`) that pretraining, SFT, LoRA, the reward model and RL share,
differing only in their batch source, loss function and trainable parameters.

* :mod:`.config` -- the frozen :class:`~.config.TrainConfig` and recipes as plain data;
* :mod:`.loop` -- :func:`~.loop.fit`: accumulation normalised by the global count of supervised
  units, clipping, AdamW, schedule, mixed precision, metrics, DCP checkpoints, exact resume;
* :mod:`.losses` -- :func:`~.losses.next_token_loss` on the fused vocabulary-chunked log-probs;
* :mod:`.parallel` -- mesh, tensor parallelism, activation checkpointing, compile, FSDP2, from outside;
* :mod:`.state` -- atomic ``torch.distributed.checkpoint`` checkpoints of a run;
* :mod:`.schedule`, :mod:`.metrics`, :mod:`.data`, :mod:`.pretrain`, :mod:`.export`, :mod:`.cli`.

Nothing here is imported by ``import opengemma``; importing this package changes no global state.
"""
