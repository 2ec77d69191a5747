"""fastdd's configuration: typed dataclass sections per concern, composed into one config per command.

Every option is one field declared with :func:`option` (default, help, checks); :func:`check_config` validates a
config from those declarations, and the command line is derived from the same fields (:mod:`fastdd.commands`).
"""

from fastdd.config.distill import (
    METHOD_CONFIGS,
    DistillConfig,
    DMConfig,
    DSAConfig,
    GradientMatchingConfig,
    SyntheticSetConfig,
    TeslaCompatConfig,
    TeslaConfig,
    TrajectoryConfig,
    method_config,
)
from fastdd.config.options import (
    ConfigError,
    OptionInfo,
    check_config,
    from_options,
    option,
    pick,
    redefault,
)
from fastdd.config.sections import (
    AugmentationConfig,
    DataConfig,
    DeviceConfig,
    ModelConfig,
)
from fastdd.config.trust import MDTConfig, OutliersConfig, RobustConfig

__all__ = [
    "AugmentationConfig",
    "ConfigError",
    "DMConfig",
    "DSAConfig",
    "DataConfig",
    "DeviceConfig",
    "DistillConfig",
    "GradientMatchingConfig",
    "METHOD_CONFIGS",
    "MDTConfig",
    "ModelConfig",
    "OptionInfo",
    "OutliersConfig",
    "RobustConfig",
    "SyntheticSetConfig",
    "TeslaCompatConfig",
    "TeslaConfig",
    "TrajectoryConfig",
    "check_config",
    "method_config",
    "from_options",
    "option",
    "pick",
    "redefault",
]
