"""The rule an SP group applies to every call's rank outcomes (`agreed_error`, what
`WorkerGroup._all` uses): the same failure on every rank is the request's error, anything else
breaks the group. Outcomes are built as Ray delivers them (a task error as an instance of its
cause, a dead actor's error)."""

from __future__ import annotations

import pytest
import torch
from ray.exceptions import ActorDiedError, RayTaskError

from deployments.oom import is_oom
from deployments.sp_group import RanksDisagree, StepReport, agreed_error


def failed(cause: BaseException, pid: int = 1) -> BaseException:
    return RayTaskError("DenoiseWorker.step", f"Traceback (pid {pid}) ...", cause, pid=pid).as_instanceof_cause()


OK = StepReport(0.1, ())


def test_every_rank_ok_is_no_error():
    assert agreed_error([OK, OK]) is None
    assert agreed_error([OK]) is None


def test_the_same_error_on_every_rank_is_the_requests_error():
    errors = [failed(ValueError("bad input: 31 channels"), pid) for pid in (1, 2)]
    assert agreed_error(errors) is errors[0]


def test_out_of_memory_on_every_rank_agrees_whatever_the_figures():
    errors = [
        failed(torch.OutOfMemoryError(f"CUDA out of memory. Process {pid} has {pid}.5 GiB in use"), pid)
        for pid in (11, 12)
    ]
    error = agreed_error(errors)
    assert error is errors[0] and is_oom(error)


def test_one_rank_alone_failing_is_its_own_agreement():
    error = failed(torch.OutOfMemoryError("injected"))
    assert agreed_error([error]) is error  # SP=1: the request's error, as before


@pytest.mark.parametrize(
    "outcomes, needle",
    [
        ([OK, failed(ValueError("x"))], "1 of 2 ranks failed"),
        ([failed(ValueError("x")), failed(ValueError("y"))], "failed differently"),
        ([failed(ValueError("x")), failed(KeyError("x"))], "failed differently"),
        ([failed(torch.OutOfMemoryError("oom")), failed(RuntimeError("no batch in progress"))], "differently"),
        ([failed(ValueError("x")), ActorDiedError()], "a worker died"),
        ([ActorDiedError()], "a worker died"),
    ],
)
def test_ranks_that_disagree_or_died_break_the_group(outcomes, needle):
    with pytest.raises(RanksDisagree, match=needle):
        agreed_error(outcomes)
