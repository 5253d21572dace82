"""SAM-Med3D-MoE (Wang et al., MICCAI 2024): a hand-written SAM-Med3D (checkpoint-compatible with the official
`vit_b_ori` / turbo weights), task-expert mask decoders, a gating network and the mask selector.

Files follow the paper's Fig. 2: `image_encoder.py`, `prompt_encoder.py`, `mask_decoder.py` (general expert and
task experts), `gate.py` (Sec. 2.2), `selector.py` (Sec. 2.3), `moe.py` (the assembled model); `clicks.py` and
`interaction.py` simulate the interactive protocol; `train.py`, `finetune_expert.py`, `train_gate.py`,
`predict.py`, `evaluate.py`, `convert_checkpoint.py` and `demo.py` are the command-line entry points.
"""
