"""Configurations: the SAM-Med3D architecture (official `vit_b_ori` and a small CPU variant) and the MoE gate."""

from dataclasses import dataclass, field

from shared.errors import InputError


@dataclass
class SamConfig:
    """Architecture of SAM-Med3D; the defaults are the official `vit_b_ori` (turbo) model, 100,509,232 parameters.

    `vit_b_ori` is built by the official `_build_sam3D_ori`; changing any field except `box_prompts` gives a
    model that no released checkpoint fits.
    """

    image_size: int = 128  # cubic input crop (voxels at 1.5 mm)
    patch_size: int = 16  # ViT patch: 128 / 16 = 8^3 image-embedding grid
    encoder_dim: int = 768  # ViT-B width
    encoder_depth: int = 12
    encoder_heads: int = 12  # head dim 64
    mlp_ratio: float = 4.0
    # windowed blocks zero-pad the 8^3 grid to one 14^3 window (no mask): kept because the weights were trained so
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)  # blocks with global attention over the 8^3 grid
    prompt_dim: int = 384  # neck output = prompt/decoder width; must be divisible by 3 (x, y, z Fourier features)
    mask_in_chans: int = 16  # hidden channels of the dense mask-prompt downscaler
    decoder_depth: int = 2  # two-way transformer layers (hard-coded 2 in the official MaskDecoder3D)
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3  # mask tokens = 3 + 1; SAM-Med3D only ever uses mask 0
    iou_head_hidden_dim: int = 256
    # new box-corner embeddings (the official model has none); False keeps the official state_dict exactly
    box_prompts: bool = False

    def __post_init__(self):
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.encoder_dim % self.encoder_heads:
            raise ValueError(f"encoder_dim {self.encoder_dim} must be divisible by encoder_heads {self.encoder_heads}")
        if self.prompt_dim % 3 or self.prompt_dim % 8:
            raise ValueError(f"prompt_dim {self.prompt_dim} must be divisible by 3 (x/y/z features) and 8 (upscaling)")
        if (self.prompt_dim // 2) % self.decoder_heads:
            raise ValueError(f"prompt_dim / 2 = {self.prompt_dim // 2} must be divisible by {self.decoder_heads} heads")
        if self.mask_in_chans % 4:
            raise ValueError(f"mask_in_chans {self.mask_in_chans} must be divisible by 4")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} lie outside the {self.encoder_depth} encoder blocks")

    @property
    def grid(self) -> int:
        """Side of the image-embedding grid (8 for vit_b_ori)."""
        return self.image_size // self.patch_size

    @property
    def low_res(self) -> int:
        """Side of the low-resolution mask logits (4 x grid: two 2x transposed convolutions)."""
        return 4 * self.grid


def small_config(**overrides) -> SamConfig:
    """A small SAM-Med3D for tests and CPU demos: 64^3 input, patch 8 (still an 8^3 embedding grid, so the
    mask geometry matches the official model), width 96, 4 blocks, one padded 10^3 window, box prompts on."""
    values = dict(
        image_size=64,
        patch_size=8,
        encoder_dim=96,
        encoder_depth=4,
        encoder_heads=4,
        window_size=10,
        global_attn_indexes=(1, 3),
        prompt_dim=96,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
        box_prompts=True,
    )
    values.update(overrides)
    return SamConfig(**values)


CONFIG_NAMES = ("vit_b_ori", "small", "tiny")  # the architectures a --config flag names


def config_by_name(name: str, box_prompts: bool = True) -> SamConfig:
    """ "vit_b_ori" (official default), "small" (CPU demos) or "tiny" (tests: 32^3 input, patch 4, width 48)."""
    if name == "vit_b_ori":
        return SamConfig(box_prompts=box_prompts)
    if name == "small":
        return small_config(box_prompts=box_prompts)
    if name == "tiny":
        return small_config(
            image_size=32,
            patch_size=4,
            encoder_dim=48,
            encoder_depth=2,
            global_attn_indexes=(1,),
            prompt_dim=48,
            mask_in_chans=8,
            decoder_mlp_dim=64,
            iou_head_hidden_dim=16,
            box_prompts=box_prompts,
        )
    raise InputError(f"--config must be vit_b_ori, small or tiny, got {name!r}.")


SELECTOR_MODES = ("weighted", "avg", "aft_weight", "general", "top1")


@dataclass
class GateConfig:
    """The gating network (paper Sec. 2.2) and the mask selector (Sec. 2.3)."""

    # task names of the specific experts, in expert order; gate class 0 is the general expert
    tasks: tuple[str, ...] = field(default_factory=tuple)
    dim: int = 384  # width of the image and prompt embeddings (= SamConfig.prompt_dim)
    heads: int = 8  # attention heads (the paper gives none; SAM's decoder uses 8)
    downsample_rate: int = 2  # attention internal width dim / 2, as SAM's cross-attention
    mlp_dim: int = 1024  # MLP on the prompt embedding
    hidden_dim: int = 256  # first of the two fully connected layers before the softmax
    tau: float = 0.5  # selector threshold on the top specific-expert score (paper: 0.5 beats 0.7)
    selector: str = "weighted"  # "weighted" (paper), Table 2 "avg" / "aft_weight", or "general" / "top1"

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one specific expert")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks} name a task twice")
        if (self.dim // self.downsample_rate) % self.heads:
            raise ValueError(
                f"dim / downsample_rate = {self.dim // self.downsample_rate} not divisible by {self.heads}"
            )
        if not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must lie in [0, 1), got {self.tau}")
        if self.selector not in SELECTOR_MODES:
            raise ValueError(f"selector must be one of {SELECTOR_MODES}, got {self.selector!r}")

    @property
    def num_classes(self) -> int:
        """Gate outputs: the general expert (class 0) and one per specific expert."""
        return 1 + len(self.tasks)
