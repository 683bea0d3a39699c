"""Membership attacks as registered objects: a new attack is one class in one file plus one registration.

An attack declares its ``name``, its ``scenario`` (1: only the synthetic
images are released; 2: the model is released), what it ``needs``, the paper
it implements and its ``cost``; it scores the evaluated images (members,
then non-members) so that higher means "more likely a member".  The check
runs every registered attack the policy selects (``synthetic_attacks`` /
``model_attacks``), in registration order, and chooses among them on held-out
data.

Registering::

    from audit.membership_inference.registry import register_attack
    register_attack("my_attack", "mypackage.attacks:MyAttack", scenario=2)

This module imports nothing heavy, so the settings model can validate attack
names without torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar


class MembershipAttack:
    """Base of every attack; subclasses of :class:`~.synthetic_attacks.SyntheticAttack` or
    :class:`~.model_attacks.ModelAttack` implement the scoring."""

    name: ClassVar[str] = ""
    scenario: ClassVar[int] = 0
    needs: ClassVar[tuple[str, ...]] = ()
    reference: ClassVar[str] = ""

    def __init__(self, settings: Any):
        self.settings = settings  # the check's settings (attacks read their own keys from it)

    def cost(self) -> dict:
        """What one run of the attack costs, in units a reader can scale (forward passes, distances)."""
        return {}

    def describe(self) -> dict:
        return {"scenario": self.scenario, "needs": list(self.needs), "reference": self.reference,
                "cost": self.cost()}


@dataclass(frozen=True)
class AttackEntry:
    target: str  # "package.module:Class"
    scenario: int


_ATTACKS: dict[str, AttackEntry] = {
    "dcr_pixel": AttackEntry("audit.membership_inference.synthetic_attacks:PixelDCR", 1),
    "dcr_embedding": AttackEntry("audit.membership_inference.synthetic_attacks:EmbeddingDCR", 1),
    "domias": AttackEntry("audit.membership_inference.synthetic_attacks:Domias", 1),
    "loss": AttackEntry("audit.membership_inference.model_attacks:LossAttack", 2),
    "pia": AttackEntry("audit.membership_inference.model_attacks:PiaAttack", 2),
    "secmi": AttackEntry("audit.membership_inference.model_attacks:SecmiAttack", 2),
    "sima": AttackEntry("audit.membership_inference.model_attacks:SimaAttack", 2),
    "pfami": AttackEntry("audit.membership_inference.model_attacks:PfamiAttack", 2),
    "mirror": AttackEntry("audit.membership_inference.model_attacks:MirrorAttack", 2),
}


def register_attack(name: str, target: str, scenario: int) -> None:
    """Register an attack class by dotted path; ``scenario`` 1 (synthetic set) or 2 (model)."""
    if scenario not in (1, 2):
        raise ValueError(f"scenario {scenario!r} must be 1 (synthetic set released) or 2 (model released)")
    _ATTACKS[name] = AttackEntry(target, scenario)


def unregister_attack(name: str) -> None:
    _ATTACKS.pop(name, None)


def attack_names(scenario: int | None = None) -> list[str]:
    """Registered attacks (of one scenario), in registration order."""
    return [n for n, e in _ATTACKS.items() if scenario is None or e.scenario == scenario]


def attack_class(name: str) -> type[MembershipAttack]:
    if name not in _ATTACKS:
        from audit.core.settings import did_you_mean

        raise ValueError(f"unknown membership attack {name!r}{did_you_mean(name, _ATTACKS)}; "
                         f"registered: {', '.join(_ATTACKS)}")
    module, _, cls = _ATTACKS[name].target.partition(":")
    return getattr(importlib.import_module(module), cls)


def create_attacks(names, settings: Any, scenario: int) -> list[MembershipAttack]:
    """The selected attacks of one scenario, in registration order."""
    wanted = set(names)
    return [attack_class(n)(settings) for n in attack_names(scenario) if n in wanted]
