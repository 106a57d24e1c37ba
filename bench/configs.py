"""The layers the benchmark measures, named after the models they come from, and its token counts.

Sizes are in elements: ``d_model`` and ``d_ff`` are the model width and one expert's hidden width (the
"moe_intermediate_size" of Hugging Face configs), ``num_experts`` routed experts, ``k`` of them per token.
Shared experts and attention are left out: only the routed MoE layer is measured.

GPU configs are the published sizes. CPU configs are the same layers with d_model and d_ff divided by
``CPU_SCALE`` (expert count, k, router and activation unchanged), plus the three "main job" layers of
issue 2, so that the whole default CPU run takes a few minutes on two cores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class BenchConfig:
    """One MoE layer: the keyword arguments of ``moe_kernels.MoE`` plus a name and where it comes from."""

    name: str
    d_model: int
    d_ff: int
    num_experts: int
    k: int
    activation: str = "swiglu"
    router: str = "topk"
    capacity_factor: float | None = None
    source: str = ""

    def layer_arguments(self) -> dict:
        """The constructor arguments of ``moe_kernels.reference.MoE`` / ``moe_kernels.MoE``."""
        arguments = asdict(self)
        del arguments["name"], arguments["source"]
        return arguments

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def up_width(self) -> int:
        """Output width of GEMM 1: 2·d_ff for gated activations, else d_ff."""
        return (2 if self.gated else 1) * self.d_ff


MODEL_CONFIGS = (
    BenchConfig("Mixtral-8x7B", 4096, 14336, 8, 2, source="mistralai/Mixtral-8x7B-v0.1 config.json"),
    BenchConfig("Qwen3-30B-A3B", 2048, 768, 128, 8, source="Qwen/Qwen3-30B-A3B config.json"),
    # DeepSeek-V3 routes with sigmoid scores, node-limited groups and a bias; here plain softmax top-8.
    BenchConfig("DeepSeek-V3-like", 7168, 2048, 256, 8, source="deepseek-ai/DeepSeek-V3 sizes, softmax top-k router"),
    BenchConfig(
        "Switch-Base", 768, 3072, 128, 1, activation="relu", router="switch", capacity_factor=1.25,
        source="Fedus et al. 2021, Switch-Base-128",
    ),
    BenchConfig(
        "Shazeer-style", 512, 1024, 256, 4, activation="relu", router="noisy_topk",
        source="Shazeer et al. 2017, noisy top-k gating (sizes illustrative)",
    ),
)

CPU_SCALE = 8

MAIN_JOB_CPU_CONFIGS = (
    BenchConfig("main-8e-top2", 512, 1024, 8, 2, source="issue 2: 8 experts, k=2"),
    BenchConfig("main-64e-top8", 512, 128, 64, 8, source="issue 2: 64 experts, k=8, small d_ff"),
    BenchConfig(
        "main-switch-cap1.25", 512, 1024, 16, 1, activation="relu", router="switch", capacity_factor=1.25,
        source="issue 2: Switch top-1 with capacity",
    ),
)


def scaled_for_cpu(config: BenchConfig, scale: int = CPU_SCALE) -> BenchConfig:
    """The same layer with d_model and d_ff divided by ``scale`` (at least 16 each)."""
    return replace(
        config,
        name=f"{config.name}/{scale}",
        d_model=max(16, config.d_model // scale),
        d_ff=max(16, config.d_ff // scale),
        source=f"{config.name} with d_model, d_ff / {scale}",
    )


GPU_CONFIGS = MODEL_CONFIGS
CPU_CONFIGS = MAIN_JOB_CPU_CONFIGS + tuple(scaled_for_cpu(config) for config in MODEL_CONFIGS)

GPU_TOKENS = (1, 64, 1024, 4096, 16384)
CPU_TOKENS = (1, 16, 256)
CPU_TOKENS_FULL = (1, 16, 64, 256, 1024, 4096)
# --quick: the smallest useful grid, to check that everything runs.
QUICK_TOKENS = (1, 64)

ROUTINGS = ("uniform", "zipf")


def select(configs: tuple[BenchConfig, ...], names: list[str] | None) -> tuple[BenchConfig, ...]:
    """The configs whose name contains one of ``names`` (case-insensitive); all when ``names`` is None."""
    if not names:
        return configs
    chosen = tuple(c for c in configs if any(n.lower() in c.name.lower() for n in names))
    if not chosen:
        raise SystemExit(f"--configs {names} matches none of {[c.name for c in configs]}")
    return chosen
