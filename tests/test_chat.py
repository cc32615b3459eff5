"""``orthrus chat``: two user turns piped through stdin, replies checked against offline greedy
generation on the same chat messages (the real default model, parallel mode, fresh adapter)."""

from __future__ import annotations

import io
import re

import pytest

from orthrus import cli
from orthrus.commands import chat

STATS = re.compile(r"^\[\d+ tokens, [\d.]+ tok/s, TPF [\d.]+, acceptance [\d.]+, [\d.]+ s, finish: (stop|length)\]$")
N = 8


@pytest.fixture()
def run_chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, real_engine):
    """Run ``orthrus chat`` in-process on ``stdin`` text (the shared engine, no second load)."""
    monkeypatch.setattr(chat, "load_engine", lambda args, **kw: real_engine)

    def run(stdin: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = cli.main(["chat", "--adapter", "init", "--mode", "parallel", "--block-size", "4",
                         "--max-new-tokens", str(N), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_two_turns_reset_and_eof(run_chat, real_engine) -> None:
    q1, q2 = "Name a fruit.", "Why?"  # the answer to q2 depends on the history
    code, out, err = run_chat(f"{q1}\n{q2}\n/reset\n{q1}\n")  # ends at end of input (no /exit)
    assert code == 0

    def ref(messages: list[dict]) -> str:
        return real_engine.generate([messages], mode="ar", max_new_tokens=N)[0].text

    a1 = ref([{"role": "user", "content": q1}])
    a2 = ref([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
              {"role": "user", "content": q2}])
    assert a1 != a2
    # the second turn saw the first (history kept); after /reset the first question is answered afresh
    assert out == f"{a1}\n{a2}\n{a1}\n"
    stats = [line for line in err.splitlines() if line.startswith("[") and "tok/s" in line]
    assert len(stats) == 3 and all(STATS.match(s) for s in stats), err
    assert "[conversation cleared]" in err


def test_exit_and_unknown_command(run_chat) -> None:
    code, out, err = run_chat("/help\n\n/exit\nnever answered\n")
    assert code == 0 and out == ""
    assert "unknown command /help" in err


def test_system_message(run_chat, real_engine) -> None:
    system = "You answer in French."
    code, out, _ = run_chat("Say hello.\n/exit\n", "--system", system)
    ref = real_engine.generate([[{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}]],
                               mode="ar", max_new_tokens=N)[0].text
    assert code == 0 and out == ref + "\n"


def test_bad_option_fails_before_loading(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["chat", "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.startswith("orthrus: error:")
