"""Task-conditional mixture-of-experts UNet for missing-modality lesion segmentation (Novosad et al., MICCAI 2024).

Read top-down: `moe_layer.py` (the fused MoE conv, Eq. 3), `model.py` (the UNet of Fig. 1), `losses.py`
(Eq. 1, 2, 4-7), `data.py`, `train.py`, `predict.py`, `evaluate.py`, `demo.py`.
"""
