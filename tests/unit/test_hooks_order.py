"""Which other programs run before meshcni's on the connect hooks (meshcni.datapath.hooks.ahead_of_meshcni)."""

from meshcni.datapath.hooks import HookProgram, ahead_of_meshcni


def _progs(hook: str, *owners: str) -> list[HookProgram]:
    return [HookProgram(hook, i, 100 * i + len(hook), f"p{i}", owner == "ours") for i, owner in enumerate(owners, 1)]


def test_others_before_meshcni_on_a_connect_hook_are_named():
    listed = _progs("connect4", "other", "other", "ours", "other") + _progs("sockops", "other", "ours")
    ahead = ahead_of_meshcni(listed)
    assert list(ahead) == ["connect4"]  # sockops does not rewrite destinations
    assert [p.position for p in ahead["connect4"]] == [1, 2]


def test_nothing_ahead_when_meshcni_runs_first_or_has_no_program_there():
    assert ahead_of_meshcni(_progs("connect4", "ours", "other") + _progs("connect6", "other", "other")) == {}
    assert ahead_of_meshcni([]) == {}


def test_an_sk_lookup_program_ahead_of_meshcnis_is_named():
    ahead = ahead_of_meshcni(_progs("sk_lookup", "other", "ours"))
    assert [p.position for p in ahead["sk_lookup"]] == [1]
