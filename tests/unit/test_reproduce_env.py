"""What `graftline reproduce` counts as another environment, and the verdict it gives (tested
end to end, rebuilding under other kernels, in tests/integration/test_reproduce.py)."""

from pathlib import Path

import pytest

from graftline.reproduce import Check, Report, other_environments
from graftline.train import cpu_model, environment

INTEL = "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
ENV = {"torch": "2.13.0+cpu", "cpu_capability": "AVX2", "device": "cpu", "cpu": INTEL}


def tags(**env: str) -> dict[str, str]:
    return {f"graftline.env.{k}": v for k, v in env.items()}


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: {INTEL}  \n")
    assert cpu_model(info) == INTEL
    assert cpu_model(tmp_path / "missing")  # platform.processor() or "unknown"
    assert environment()["cpu"] == cpu_model()


def test_another_cpu_model_with_other_bytes_is_another_environment() -> None:
    rebuilt = {**ENV, "cpu": "AMD EPYC"}
    found = other_environments(tags(**ENV), rebuilt, same_bytes=False)
    assert found == (
        f"avx2, torch 2.13.0+cpu, cpu, {INTEL}",
        "avx2, torch 2.13.0+cpu, cpu, AMD EPYC",
    )


@pytest.mark.parametrize(
    ("registered", "rebuilt", "same_bytes"),
    [
        (ENV, ENV, False),  # the same environment: the bytes decide (NOT identical)
        (ENV, {**ENV, "cpu": "AMD EPYC"}, True),  # another CPU, the same bytes: identical
        # registered before the CPU model was recorded: not compared on it
        ({k: v for k, v in ENV.items() if k != "cpu"}, {**ENV, "cpu": "AMD EPYC"}, False),
        ({}, {**ENV, "cpu_capability": "DEFAULT"}, False),  # no environment recorded
    ],
    ids=["same", "same-bytes", "no-cpu-tag", "no-tags"],
)
def test_the_bytes_decide_otherwise(
    registered: dict[str, str], rebuilt: dict[str, str], same_bytes: bool
) -> None:
    assert other_environments(tags(**registered), rebuilt, same_bytes) is None


@pytest.mark.parametrize(
    ("environments", "passed", "verdict", "code"),
    [
        (None, True, "bit-identical", 0),
        (None, False, "NOT identical", 1),
        (("avx512, ...", "default, ..."), True, "equivalent", 3),
        (("avx512, ...", "default, ..."), False, "different", 1),
    ],
)
def test_the_verdict_and_its_exit_code(
    environments: tuple[str, str] | None, passed: bool, verdict: str, code: int
) -> None:
    """Bytes in the same environment, tolerance in another; any failed check fails."""
    report = Report("m", "1", "abc", checks=[Check("task data", "a", "a" if passed else "b")])
    report.environments = environments
    if environments:
        report.equivalence = [Check("weights", "", "largest relative difference 1e-05", True)]
    assert (report.verdict, report.exit_code) == (verdict, code)
    last = report.text().splitlines()[-1]
    assert last.startswith(f"m v1: {verdict}")
    assert ("registered on avx512" in last) == bool(environments)
    assert ("DIFFERS" in report.text()) != passed
