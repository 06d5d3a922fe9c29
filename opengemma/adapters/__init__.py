"""LoRA adapters shipped with the package (report section "Instruction Tuning").

``default/`` is the chat adapter for the embedded Gemma 3 270M (a pretrained, not
instruction-tuned model, whose chat turns otherwise never end): `opengemma chat --adapter
default`. It is the adapter of the recorded SFT run in ``bench/results/sft-270m/`` (LoRA on
GSM8K, OpenAssistant and Self-Instruct conversations through the Gemma chat template), a Model
Derivative under the Gemma Terms of Use: see ``default/NOTICE``. Read it with
:func:`opengemma.train.lora.adapter_dir`.
"""
