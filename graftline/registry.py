"""The model registry: register, gate, promote, roll back, history.

MLflow owns what is live: the ``champion`` alias of the registered model. MLflow keeps no
alias history and has no compare-and-set, so this module (1) re-reads the champion just
before moving the alias and refuses if it changed since the caller looked, and (2) records
every promotion and rollback as a tag on the registered model (``graftline.event.<ns>``),
which is where ``history`` and ``rollback`` read from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

from graftline.errors import GraftlineError

CHAMPION = "champion"
CHALLENGER = "challenger"
EVENT_PREFIX = "graftline.event."


class RegistryError(GraftlineError):
    """A registry operation was refused; the registry is unchanged."""


class PromotionConflict(RegistryError):
    """The champion changed between reading it and moving the alias."""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None = None
    champion_version: str | None = None
    p_value: float | None = None
    n: int = 0

    def as_tags(self) -> dict[str, str]:
        return {
            "graftline.gate.passed": str(self.passed).lower(),
            "graftline.gate.reason": self.reason[:5000],
            "graftline.gate.challenger_accuracy": f"{self.challenger_accuracy:.6f}",
            "graftline.gate.champion_accuracy": ""
            if self.champion_accuracy is None
            else f"{self.champion_accuracy:.6f}",
            "graftline.gate.champion_version": self.champion_version or "",
            "graftline.gate.p_value": "" if self.p_value is None else f"{self.p_value:.6g}",
        }


def mcnemar_p(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> float:
    """One-sided exact McNemar test: p-value that the challenger is *not* better.

    Only the items where the two disagree carry information; under the null hypothesis each
    such item is a fair coin.
    """
    wins = int(np.sum(challenger_correct & ~champion_correct))
    losses = int(np.sum(~challenger_correct & champion_correct))
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def gate(
    challenger_correct: np.ndarray,
    champion_correct: np.ndarray | None,
    *,
    min_accuracy: float,
    min_improvement: float,
    alpha: float,
    champion_version: str | None = None,
) -> GateDecision:
    """Decide whether the challenger may replace the champion, scored on the same items.

    Pass only if the challenger clears ``min_accuracy`` and, when there is a champion, beats
    it by at least ``min_improvement`` with a one-sided McNemar p-value below ``alpha``.
    """
    ch = np.asarray(challenger_correct, dtype=bool)
    acc = float(ch.mean()) if len(ch) else 0.0
    common = {"challenger_accuracy": acc, "n": len(ch), "champion_version": champion_version}
    if acc < min_accuracy:
        return GateDecision(
            False, f"accuracy {acc:.4f} is below the minimum {min_accuracy:.4f}", **common
        )
    if champion_correct is None:
        return GateDecision(
            True,
            f"no champion yet; accuracy {acc:.4f} clears the minimum {min_accuracy:.4f}",
            **common,
        )
    cp = np.asarray(champion_correct, dtype=bool)
    if cp.shape != ch.shape:
        raise ValueError("challenger and champion must be scored on the same items")
    champ = float(cp.mean())
    p = mcnemar_p(ch, cp)
    common.update(champion_accuracy=champ, p_value=p)
    delta = acc - champ
    vs = f"{acc:.4f} vs champion v{champion_version} {champ:.4f} on the same {len(ch)} items"
    if delta <= 0 or delta < min_improvement:
        what = "no better than" if delta <= 0 else "improves by less than the minimum on"
        return GateDecision(
            False, f"{what} the champion: {vs} (min improvement {min_improvement:.4f})", **common
        )
    if p >= alpha:
        return GateDecision(
            False, f"win not significant: {vs}, McNemar p={p:.3g} >= {alpha}", **common
        )
    return GateDecision(True, f"better than the champion: {vs}, McNemar p={p:.3g}", **common)


def score_model(model_uri: str, images: Any, truth: list[str]) -> np.ndarray:
    """Load a model through MLflow (as serving will) and mark each item right or wrong:
    pixels, or a table of texts for a text model."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    is_table = hasattr(images, "columns")
    pred = model.predict(images if is_table else np.asarray(images, dtype=np.float32))
    return np.asarray(pred["class"].astype(str).to_numpy() == np.asarray(truth), dtype=bool)


@dataclass
class Challenge:
    """A model and the champion scored on the same test items: what the gate judges."""

    challenger_correct: np.ndarray
    champion_version: str | None
    champion_correct: np.ndarray | None

    def decide(self, min_accuracy: float, min_improvement: float, alpha: float) -> GateDecision:
        """The gate's decision (:func:`gate`) on these scores."""
        return gate(
            self.challenger_correct,
            self.champion_correct,
            champion_version=self.champion_version,
            min_accuracy=min_accuracy,
            min_improvement=min_improvement,
            alpha=alpha,
        )


def challenge(
    name: str, model_uri: str, champion_version: str | None, images: Any, truth: list[str]
) -> Challenge:
    """Score ``model_uri`` and, if there is one, the champion version of model ``name`` on
    the same items, each loaded through MLflow as serving will load it. ``deploy`` and
    ``graftline promote`` both gate on this.

    Raises:
        RegistryError: the champion cannot be scored on these items (another input shape).
    """
    if not hasattr(images, "columns"):
        images = np.asarray(images, dtype=np.float32)
    challenger = score_model(model_uri, images, truth)
    champion = None
    if champion_version is not None:
        from mlflow.exceptions import MlflowException

        try:
            champion = score_model(f"models:/{name}/{champion_version}", images, truth)
        # another input geometry, or texts for an image model: not comparable on this test set
        except (ValueError, MlflowException) as err:
            raise RegistryError(
                f"champion v{champion_version} cannot be scored on the current test split "
                f"({err}); promote by hand with `graftline promote VERSION --force`"
            ) from None
    return Challenge(challenger, champion_version, champion)


class Registry:
    """graftline's operations on one registered model, over an ``MlflowClient``."""

    def __init__(self, name: str, client: Any | None = None) -> None:
        from mlflow import MlflowClient

        self.name = name
        self.client = client or MlflowClient()

    # ------------------------------------------------------------------ reading
    def champion(self) -> Any | None:
        """The model version holding the champion alias, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, CHAMPION)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def champion_version(self) -> str | None:
        mv = self.champion()
        return None if mv is None else str(mv.version)

    def version(self, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise RegistryError(f"model {self.name!r} has no version {version}") from None

    def history(self) -> list[dict[str, Any]]:
        """Promotions and rollbacks, oldest first."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException:
            return []
        events = [json.loads(v) for k, v in rm.tags.items() if k.startswith(EVENT_PREFIX)]
        return sorted(events, key=lambda e: e["time_ns"])

    # ------------------------------------------------------------------ writing
    def register(self, model_uri: str, run_id: str | None, tags: dict[str, str]) -> str:
        """A new version from a logged model, aliased ``challenger``; returns its number."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # MLflow 3 logged models ("models:/m-<id>") are registered through their model id.
        model_id = model_uri.split("/")[-1] if model_uri.startswith("models:/m-") else None
        mv = self.client.create_model_version(
            self.name, model_uri, run_id=run_id, tags=tags, model_id=model_id
        )
        self.client.set_registered_model_alias(self.name, CHALLENGER, mv.version)
        return str(mv.version)

    def _record(self, action: str, version: str, previous: str | None, reason: str) -> dict:
        event = {
            "action": action,
            "version": version,
            "previous": previous,
            "reason": reason,
            "time_ns": time.time_ns(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.client.set_registered_model_tag(
            self.name, f"{EVENT_PREFIX}{event['time_ns']}", json.dumps(event)
        )
        return event

    def promote(
        self, version: str, *, expected_champion: str | None, reason: str, action: str = "promote"
    ) -> dict:
        """Move ``champion`` to ``version`` if the champion is still ``expected_champion``.

        Raises:
            PromotionConflict: another promotion moved the champion in the meantime.
        """
        version = str(version)
        self.version(version)  # exists?
        current = self.champion_version()  # re-read just before moving the alias
        if current != expected_champion:
            raise PromotionConflict(
                f"champion of {self.name!r} changed while this promotion was decided "
                f"(expected {_v(expected_champion)}, found {_v(current)}); refusing to move it"
            )
        if current == version:
            raise RegistryError(f"version {version} is already the champion")
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        self.client.set_model_version_tag(
            self.name, version, "graftline.previous_champion", current or ""
        )
        # The new champion is no longer a challenger: one alias, one meaning.
        if version in self._versions_aliased(CHALLENGER):
            self.client.delete_registered_model_alias(self.name, CHALLENGER)
        event = self._record(action, version, current, reason)
        self._describe(event)
        return event

    def _versions_aliased(self, alias: str) -> set[str]:
        from mlflow.exceptions import MlflowException

        try:
            return {str(self.client.get_model_version_by_alias(self.name, alias).version)}
        except MlflowException:
            return set()

    def _describe(self, event: dict[str, Any]) -> None:
        """The registered model's description in the MLflow UI: which version is live, since
        when and why (each version's own description is its model card)."""
        verb = {"promote": "promoted", "rollback": "rolled back to"}.get(
            event["action"], event["action"]
        )
        text = (
            f"**{self.name}**: the `champion` alias marks the version in production, "
            "`challenger` the newest registered version that was not promoted. Each version's "
            "description is its model card (data, test figures, gate decision, how to "
            "reproduce it).\n\n"
            f"**Champion: v{event['version']}**, {verb} {event['time']} "
            f"(was {_v(event['previous'])}): {event['reason']}.\n\n"
            "History of champions: `graftline history`."
        )
        self.client.update_registered_model(self.name, description=text)

    def rollback(self, reason: str = "manual rollback") -> dict:
        """Put back the champion that the current one replaced."""
        current = self.champion_version()
        if current is None:
            raise RegistryError(f"model {self.name!r} has no champion to roll back")
        promotions = [
            e for e in self.history() if e["version"] == current and e["action"] == "promote"
        ]
        previous = promotions[-1]["previous"] if promotions else None
        if not previous:
            raise RegistryError(
                f"champion v{current} of {self.name!r} replaced no earlier champion; "
                "nothing to roll back to"
            )
        self.client.set_registered_model_alias(self.name, CHAMPION, previous)
        event = self._record("rollback", previous, current, reason)
        self._describe(event)
        return event


def _v(version: str | None) -> str:
    return "no champion" if version is None else f"v{version}"
