from hypothesis import given
from hypothesis import strategies as st

from streamer.core.stabilizer import LocalAgreement, common_prefix_length


def test_common_prefix_length():
    assert common_prefix_length([]) == 0
    assert common_prefix_length([(1, 2, 3), (1, 2, 4)]) == 2
    assert common_prefix_length([(1, 2), (1, 2, 3)]) == 2
    assert common_prefix_length([(5,), (1,)]) == 0


def test_local_agreement_2_commits_what_two_hypotheses_share():
    la = LocalAgreement(2)
    assert la.update([1, 2, 3]) == ()
    assert la.tentative == (1, 2, 3)
    # next hypothesis arrives forced with nothing committed yet
    assert la.update([1, 2, 4, 5]) == (1, 2)
    assert la.committed == (1, 2)
    assert la.tentative == (4, 5)
    # hypotheses now arrive as the tail after the committed prefix
    assert la.update([4, 5, 6]) == (4, 5)
    assert la.committed == (1, 2, 4, 5)
    assert la.tentative == (6,)


def test_agreement_n3_needs_three():
    la = LocalAgreement(3)
    assert la.update([1, 2]) == ()
    assert la.update([1, 2]) == ()
    assert la.update([1, 3]) == (1,)


def test_agreement_zero_never_commits():
    la = LocalAgreement(0)
    assert la.update([1, 2]) == ()
    assert la.update([1, 2]) == ()
    assert la.committed == ()
    assert la.tentative == (1, 2)


@given(st.integers(1, 4), st.lists(st.lists(st.integers(0, 3), max_size=8), max_size=30))
def test_committed_is_append_only_for_any_hypotheses(n, hyps):
    la = LocalAgreement(n)
    before: tuple[int, ...] = ()
    for h in hyps:
        newly = la.update(h)
        assert la.committed == before + newly
        assert tuple(h[: len(newly)]) == newly
        before = la.committed


def test_commit_stops_at_the_last_word_boundary():
    la = LocalAgreement(2)
    la.update([1, 2, 3, 4])
    # agreed on 3 tokens, but a word only ends after token 2
    assert la.update([1, 2, 3, 5], [True, False, True, False, False]) == (1, 2)
    assert la.tentative == (3, 5)
