"""Training-time methods that decide which channels a model keeps."""
from .dst import DST  # noqa: F401  (re-exported)
