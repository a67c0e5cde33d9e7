"""Training-time methods that decide which channels a model keeps."""
from .dst import DST  # noqa: F401  (re-exported)
from .grow_efficient import GrowEfficient  # noqa: F401
from .single_shot import SingleShot  # noqa: F401
from .train import fit  # noqa: F401
from .budget import Budget  # noqa: F401
