"""LoRA adapters shipped with the package (report section "Instruction Tuning").

``default/`` is the chat adapter for the embedded Gemma 3 270M, a pretrained (not instruction-
tuned) model whose chat turns otherwise run on to the token cap: `--adapter default` (chat,
generate, serve, eval) merges it into the base at load, through
:func:`opengemma.train.lora.adapter_dir`. LoRA rank 16, 7.6 MB in bf16, with its Gemma terms
``NOTICE``; how it was trained and what it measures: ``bench/results/chat-adapter-270m/``.
"""
