"""Rules over a recorded timeline. Importing the package registers the built-in
families (Windows PnP, Linux driver model, kernel oops, PCI resources, audio); ``check_all`` runs them."""

from lab.rules.base import (Limits, Phase, Rule, RuleContext, check_all, known_ids,
                            phases_from_timeline, register, registered)
from lab.rules import audio, kernel_oops, linux_driver, pci_resources, windows_pnp  # noqa: F401  (registration)

__all__ = ["Limits", "Phase", "Rule", "RuleContext", "check_all", "known_ids",
           "phases_from_timeline", "register", "registered"]
