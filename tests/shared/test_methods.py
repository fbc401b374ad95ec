from collections import Counter

import pytest

from feddiffuse.shared.errors import UserError
from feddiffuse.shared.methods import (
    METHODS,
    download_segments,
    personal_segments,
    plan_round,
    upload_assignment,
    usplit_assignment,
)

ENC, MID, DEC = "encoder", "bottleneck", "decoder"


def ids(k):
    return [f"c{i}" for i in range(k)]


def test_k1_reports_everything():
    assert usplit_assignment(["solo"], 1, 0) == {"solo": (ENC, MID, DEC)}


def test_k2_one_encoder_one_decoder_and_the_bottleneck_to_one():
    for r in range(1, 30):
        a = usplit_assignment(ids(2), r, seed=0)
        segs = sorted(a.values())
        assert Counter(s for v in segs for s in v) == {ENC: 1, MID: 1, DEC: 1}
        assert sum(ENC in v for v in segs) == 1 and sum(DEC in v for v in segs) == 1
        assert not any(ENC in v and DEC in v for v in segs)


@pytest.mark.parametrize("k", [2, 4, 5, 7, 10])
def test_pairs_cover_each_segment_once_per_pair(k):
    for r in range(1, 20):
        a = usplit_assignment(ids(k), r, seed=3)
        assert set(a) == set(ids(k))
        c = Counter(s for v in a.values() for s in v)
        pairs = k // 2
        assert c[ENC] + c[DEC] == k  # everyone reports exactly one of encoder/decoder
        assert c[MID] == pairs + (k % 2)
        assert c[ENC] >= pairs and c[DEC] >= pairs
        for v in a.values():
            assert len(v) in (1, 2) and not (ENC in v and DEC in v)
        if k % 2:
            assert sum(1 for v in a.values() if len(v) == 2 and MID in v) >= 1


def test_k5_unpaired_client_gets_bottleneck_plus_one_side_at_random():
    seen = Counter()
    for r in range(1, 200):
        a = usplit_assignment(ids(5), r, seed=0)
        c = Counter(s for v in a.values() for s in v)
        # 2 pairs give 2 encoders, 2 decoders and 2 bottlenecks; the fifth adds MID + one side.
        assert c[MID] == 3
        seen[(c[ENC], c[DEC])] += 1
    assert set(seen) == {(3, 2), (2, 3)}


def test_assignment_is_seeded_and_drawn_afresh_each_round():
    a = usplit_assignment(ids(6), 1, seed=9)
    assert a == usplit_assignment(list(reversed(ids(6))), 1, seed=9)
    rounds = {tuple(sorted(usplit_assignment(ids(6), r, seed=9).items())) for r in range(1, 15)}
    assert len(rounds) > 1
    assert usplit_assignment(ids(6), 1, seed=9) != usplit_assignment(ids(6), 1, seed=10) or \
        usplit_assignment(ids(6), 2, seed=9) != usplit_assignment(ids(6), 2, seed=10)


def test_what_each_method_sends():
    for m in METHODS:
        assert download_segments(m, 1) == (ENC, MID, DEC)  # the initial broadcast
    assert download_segments("full", 2) == (ENC, MID, DEC)
    assert download_segments("usplit", 2) == (ENC, MID, DEC)
    assert download_segments("ulatdec", 2) == (MID, DEC)
    assert download_segments("udec", 3) == (DEC,)
    assert upload_assignment("full", ids(3), 1, 0) == dict.fromkeys(ids(3), (ENC, MID, DEC))
    assert upload_assignment("ulatdec", ids(3), 1, 0) == dict.fromkeys(ids(3), (MID, DEC))
    assert upload_assignment("udec", ids(3), 1, 0) == dict.fromkeys(ids(3), (DEC,))
    assert personal_segments("full") == () and personal_segments("usplit") == ()
    assert personal_segments("ulatdec") == (ENC,)
    assert personal_segments("udec") == (ENC, MID)


def test_plan_round_and_unknown_method():
    plan = plan_round("udec", ids(2), 2, 0)
    assert plan["c0"].download == (DEC,) and plan["c1"].upload == (DEC,)
    with pytest.raises(UserError, match="Unknown method"):
        plan_round("fedprox", ids(2), 1, 0)
