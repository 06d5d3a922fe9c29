"""LoRA adapters shipped with the package (report section "Instruction Tuning").

``default/`` is where the chat adapter for the embedded Gemma 3 270M (a pretrained, not
instruction-tuned model, whose chat turns otherwise never end) goes, read by `--adapter default`
through :func:`opengemma.train.lora.adapter_dir`, with its Gemma terms ``NOTICE``. None is shipped
yet: the first recorded SFT run's adapter (``bench/results/sft-270m/``, mostly GSM8K) closes its
turns on math questions but not on general ones, so `--adapter default` says so.
"""
