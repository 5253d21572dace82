"""Task-conditional mixture-of-experts UNet for missing-modality lesion segmentation (Novosad et al., MICCAI 2024).

Read top-down: `moe_layer.py` (the fused MoE conv, Eq. 3), `model.py` (the UNet of Fig. 1), `losses.py`
(Eq. 1, 2, 4-7), `data.py` (cache parameters and the batches of paper 3.2), `train.py` (with `validate.py`
and `runs.py`, the run files), `predict.py`, `evaluate.py` (with `tables.py`, the numbers of Tables 1-3),
`demo.py`.
"""
