"""Step kinds: one class per kind, holding its fields, parsing, static checks, record
refusal and execution (``lab.steps.base`` says how). ``STEP_KINDS`` maps each YAML key
to its class; ``lab.scenario.steps`` parses with it, ``lab.scenario.loader`` checks and
``lab.runner`` runs every step through the class alone.

The kinds are defined by the modules of this package; ``lab.scenario.steps`` imports
them in the order their keys are listed in messages.
"""

# the scenario package first: it imports every kind module, in order, through
# lab.scenario.steps (importing a kind module first would meet it half-initialised)
import lab.scenario  # noqa: F401,I001  (import order matters)

from lab.steps.base import (STEP_KINDS, Job, ParseContext, StepBase, StepContext, StepFailed,
                            step_kind)

__all__ = ["STEP_KINDS", "Job", "ParseContext", "StepBase", "StepContext", "StepFailed",
           "step_kind"]
