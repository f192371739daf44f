"""The example `accelerate launch --config_file` files parse and resolve to the intended launch settings."""

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "accelerate_configs"


@pytest.mark.parametrize(
    ("name", "distributed_type", "num_processes"),
    [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 8), ("deepspeed_zero2", "DEEPSPEED", 8)],
)
def test_config_parses(name: str, distributed_type: str, num_processes: int) -> None:
    path = CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    # A bare NO would load as the boolean False; the file must give the string.
    assert raw["distributed_type"] == distributed_type
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    assert raw["mixed_precision"] == "bf16"
    assert raw["num_processes"] == num_processes
    # accelerate's own loader rejects unknown keys and bad enum values.
    config = ClusterConfig.from_yaml_file(path)
    assert config.distributed_type == DistributedType(distributed_type)
    assert config.num_processes == num_processes


def test_deepspeed_is_zero2_without_offload() -> None:
    config = ClusterConfig.from_yaml_file(CONFIGS / "deepspeed_zero2.yaml")
    ds = config.deepspeed_config
    assert ds["zero_stage"] == 2
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    # Left to the training arguments, so that one place sets them.
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
