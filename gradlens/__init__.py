"""gradlens: exact chosen/rejected gradient splits for preference optimisation,
run logs and TensorBoard dashboards, analysis and plots, and Langevin KL tracking."""

from .losses import PreferenceLossOutput, preference_loss, register_reweighting
from .recording import GradientRecorder

__version__ = "0.1.0"

__all__ = ["GradientRecorder", "PreferenceLossOutput", "preference_loss", "register_reweighting", "__version__"]
