"""snp_fx.labels: the unit space (union-find over unit ids, soft / frozen / sensitive / dependent units),
reduced label tensors, and the pruned layout of a labelled tensor under a keep mask."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snp_fx.labels import (FROZEN, NONE, Irregular, UnitSpace, constant, expand, kept_sequence, pruned_sizes,
                           reduce, varying_dims)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


class RefUnionFind:
    """The reference: a plain dict union-find over 0..n; a pair with a negative id (NONE) is ignored."""

    def __init__(self):
        self.parent = {FROZEN: FROZEN}

    def add(self, i):
        self.parent[i] = i

    def find(self, i):
        while self.parent[i] != i:
            i = self.parent[i]
        return i

    def union(self, a, b):
        if a >= 0 and b >= 0:
            self.parent[self.find(a)] = self.find(b)

    def classes(self):
        out = {}
        for i in self.parent:
            out.setdefault(self.find(i), set()).add(i)
        return list(out.values())


# ---------------------------------------------------------------------------
# UnitSpace
# ---------------------------------------------------------------------------

def test_new_allocates_consecutive_ids_after_frozen():
    s = UnitSpace()
    assert s.next_id == 1
    assert s.new(3).tolist() == [1, 2, 3]
    assert s.new(2).tolist() == [4, 5]
    assert s.next_id == 6
    assert s.new(0).numel() == 0 and s.next_id == 6
    assert s.roots().tolist() == [0, 1, 2, 3, 4, 5]  # every unit alone, FROZEN included


def test_new_grows_past_the_initial_capacity():
    s = UnitSpace()
    a = s.new(10)
    b = s.new(70_000, soft=True)  # more than the 1 << 16 preallocated ids
    c = s.new(5)
    assert b[0] == 11 and b[-1] == 70_010 and c.tolist() == list(range(70_011, 70_016))
    s.union(a[:1], b[-1:])
    s.union(b[-1:], c[-1:])
    r = s.roots()
    assert r.numel() == s.next_id
    assert int(r[b[-1]]) == int(r[c[-1]]) == int(a[0]) and int(r[b[0]]) == int(b[0])
    assert s.is_soft(b[:3]) and not s.is_soft(b[-1:])  # b[-1] joined hard units


def test_union_couples_and_the_smallest_id_is_the_root():
    s = UnitSpace()
    u = s.new(6)
    s.union(u[4:5], u[2:3])
    s.union(u[5:6], u[4:5])
    assert s.roots().tolist() == [0, 1, 2, 3, 4, 3, 3]  # ids 3, 5, 6 coupled
    s.union(torch.tensor([FROZEN]), u[5:6])
    assert s.roots().tolist() == [0, 1, 2, 0, 4, 0, 0]  # FROZEN stays the root of its class
    assert s.canon(torch.tensor([[NONE, 5], [4, FROZEN]])).tolist() == [[NONE, 0], [4, 0]]


def test_union_broadcasts_and_ignores_none_and_self_pairs():
    s = UnitSpace()
    u = s.new(5)
    s.union(torch.tensor([[1], [NONE]]), torch.tensor([[2, 3, NONE]]))  # (2, 1) with (1, 3): 1-2, 1-3
    s.union(u, u)  # self pairs: nothing
    s.union(torch.tensor([NONE, NONE]), u[:2])
    assert s.roots().tolist() == [0, 1, 1, 1, 4, 5]
    s.union(torch.tensor(5), torch.tensor(4))  # 0-d operands
    assert s.roots().tolist() == [0, 1, 1, 1, 4, 4]


ops = st.lists(st.one_of(
    st.tuples(st.just("new"), st.integers(0, 6), st.booleans()),  # allocate n units, soft or not
    st.tuples(st.just("union"), st.lists(st.tuples(st.integers(-1, 40), st.integers(-1, 40)), max_size=8))),
    max_size=12)


@SETTINGS
@given(ops=ops)
def test_union_find_classes_are_the_connected_components(ops):
    """Random allocations and batched unions against the reference: same classes, root = smallest id,
    FROZEN the root of its class, soft if every unit of the class is soft."""
    s, ref, soft = UnitSpace(), RefUnionFind(), {FROZEN: False}
    for op in ops:
        if op[0] == "new":
            ids = s.new(op[1], soft=op[2])
            for i in ids.tolist():
                ref.add(i)
                soft[i] = op[2]
        else:
            pairs = [(a, b) for a, b in op[1] if a < s.next_id and b < s.next_id]  # existing ids or NONE
            if pairs:
                a, b = torch.tensor(pairs).T
                s.union(a, b)
                for x, y in pairs:
                    ref.union(x, y)
    roots = s.roots().tolist()
    assert len(roots) == s.next_id
    for cls in ref.classes():
        assert {roots[i] for i in cls} == {min(cls)}, (cls, roots)
        assert all(s.is_soft(torch.tensor([i])) == all(soft[j] for j in cls) for i in cls if i != FROZEN)
    assert roots[FROZEN] == FROZEN
    ids = torch.arange(-1, s.next_id)
    assert s.canon(ids).tolist() == [NONE] + roots
    assert torch.equal(s.roots(), s.roots())  # compressing again changes nothing
    assert s.components().tolist() == roots


def test_is_soft():
    s = UnitSpace()
    soft, hard = s.new(3, soft=True), s.new(2)
    assert s.is_soft(soft) and not s.is_soft(hard) and not s.is_soft(torch.cat([soft, hard]))
    assert not s.is_soft(torch.tensor([NONE, FROZEN]))  # no channel at all: not soft
    assert s.is_soft(torch.tensor([[NONE, int(soft[0])]]))
    s.union(soft[:2], soft[1:])  # soft with soft stays soft
    assert s.is_soft(soft)
    s.union(soft[2:], hard[:1])  # soft with hard is hard, for the whole class
    assert not s.is_soft(soft[:1]) and not s.is_soft(soft)
    other = s.new(1, soft=True)
    s.union(torch.tensor([FROZEN]), other)
    assert not s.is_soft(other)


def test_soft_is_kept_right_through_a_chain():
    """Found by test_union_find_classes_are_the_connected_components with the converse check: two soft
    units and a hard one, coupled in one union call as 1-2, 2-3.  Round 1 hooks 2 under 1 and 3 under 2,
    and ANDs soft[3] into soft[2] only; the root 1 stays soft although its class holds the hard unit 3."""
    s = UnitSpace()
    s.new(2, soft=True)
    s.new(1)
    s.union(torch.tensor([1, 2]), torch.tensor([2, 3]))
    assert s.roots().tolist() == [0, 1, 1, 1]
    assert not s.is_soft(torch.tensor([1]))


def test_freeze_and_mark_sensitive_record_unique_unit_ids_with_reasons():
    s = UnitSpace()
    u = s.new(4)
    s.freeze(torch.tensor([[3, 1], [3, NONE], [FROZEN, 1]]), "model output")
    s.freeze(torch.tensor([NONE, FROZEN]), "nothing to freeze")  # no unit: not recorded
    s.freeze(None, "not a tensor")
    s.freeze(5, "not a tensor either")
    assert [(ids.tolist(), why) for ids, why in s.frozen] == [([1, 3], "model output")]
    s.mark_sensitive(u[1:].reshape(3, 1).expand(3, 2), "LayerNorm")
    s.mark_sensitive(torch.tensor([NONE]), "nothing")
    assert [(ids.tolist(), why) for ids, why in s.sensitive] == [([2, 3, 4], "LayerNorm")]


def test_dependent_units_and_their_support():
    s = UnitSpace()
    q = s.new(6).reshape(2, 3)  # two heads of three q/k channels
    assert not s.is_dependent(q).any() and s.is_dependent(q).shape == (2, 3)  # no dependent unit yet
    heads = s.dependent([q[0], torch.cat([q[1], torch.tensor([NONE, FROZEN])])])
    assert heads.tolist() == [7, 8] and s.next_id == 9
    assert s.support == {7: {1, 2, 3}, 8: {4, 5, 6}}  # NONE and FROZEN do not support anything
    assert s.is_dependent(torch.tensor([NONE, FROZEN, 1, 7, 8])).tolist() == [False, False, False, True, True]
    # a unit coupled to a dependent one is dependent too (its class is)
    other = s.new(1)
    s.union(other, heads[1:])
    assert s.is_dependent(other).tolist() == [True]
    # add_support: matched through the class of the dependent id; per position of dep_ids
    v = s.new(4)
    s.add_support(torch.tensor([[7, 7], [int(other), int(other)]]), torch.stack([v[:2], v[2:]]))
    assert s.support == {7: {1, 2, 3, int(v[0]), int(v[1])}, 8: {4, 5, 6, int(v[2]), int(v[3])}}
    s.add_support(torch.tensor([7, NONE]), torch.tensor([NONE, int(v[3])]))  # neither side a unit: nothing
    s.add_support(v[:1], v[1:2])  # not dependent: nothing
    assert s.support[7] == {1, 2, 3, int(v[0]), int(v[1])}
    s.add_support(torch.tensor([8]), torch.tensor([[int(v[0])], [int(v[1])]]))  # broadcast
    assert {int(v[0]), int(v[1])} <= s.support[8]


# ---------------------------------------------------------------------------
# reduced label tensors
# ---------------------------------------------------------------------------

def test_reduce_expand_by_hand():
    lab = torch.tensor([[1, 2, 3]]).expand(4, 3)  # rows the same: tokens
    assert reduce(lab).shape == (1, 3) and reduce(lab).tolist() == [[1, 2, 3]]
    assert torch.equal(expand(reduce(lab), (4, 3)), lab)
    assert reduce(torch.full((2, 3, 4), NONE)).shape == (1, 1, 1)
    assert varying_dims(torch.zeros(1, 5, 1, 2)) == [1, 3]
    assert varying_dims(torch.zeros(1, 1)) == []
    # fewer dims than the shape: leading dims are added
    assert torch.equal(expand(torch.tensor([4, 5]), (2, 3, 2)), torch.tensor([4, 5]).expand(2, 3, 2))
    c = constant(FROZEN, 3)
    assert c.shape == (1, 1, 1) and c.dtype == torch.long and int(c) == FROZEN
    assert constant(NONE, 0).shape == () and int(constant(NONE, 0)) == NONE


@SETTINGS
@given(base=st.lists(st.integers(1, 3), min_size=0, max_size=4), data=st.data())
def test_reduce_keeps_exactly_the_varying_dims(base, data):
    """A label tensor broadcast from a smaller one: reduce keeps a dim iff the labels vary along it,
    expanding the result gives the tensor back, and reducing twice changes nothing."""
    n = 1
    for b in base:
        n *= b
    small = torch.tensor(data.draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n))).reshape(base)
    shape = tuple(b if b > 1 else data.draw(st.integers(1, 3)) for b in base)
    lab = small.expand(shape)
    r = reduce(lab)
    assert r.dim() == lab.dim() and r.is_contiguous()
    for d in range(lab.dim()):
        constant_along_d = bool((lab == lab.narrow(d, 0, 1)).all())
        assert (r.shape[d] == 1) == (constant_along_d or lab.shape[d] == 1)
        if not constant_along_d:
            assert r.shape[d] == lab.shape[d]
    assert torch.equal(expand(r, shape), lab)
    assert torch.equal(reduce(r), r)
    assert varying_dims(r) == [d for d in range(r.dim()) if r.shape[d] > 1]


# ---------------------------------------------------------------------------
# pruned layouts
# ---------------------------------------------------------------------------

def head_split(heads, head_dim):
    """Labels of a (heads, head_dim) split, as a reshape of one channel dim makes them: units 1..H*D."""
    return torch.arange(1, heads * head_dim + 1).reshape(heads, head_dim)


def keep_of(lab, kept):
    """keep[id] for every id up to lab.max(): FROZEN kept, ``kept[h]`` = the head dim indices kept in head h."""
    keep = torch.zeros(int(lab.max()) + 1, dtype=torch.bool)
    keep[FROZEN] = True
    for h, idx in enumerate(kept):
        keep[lab[h, list(idx)]] = True
    return keep


def test_heads_keep_different_indices_of_the_same_count():
    lab = head_split(3, 4)
    kept = [[0, 3], [1, 2], [0, 1]]
    shape = (2, 3, 5, 4)  # (batch, heads, tokens, head_dim); the labels are reduced over batch and tokens
    r = lab[None, :, None, :]
    assert pruned_sizes(r, shape, keep_of(lab, kept)) == [2, 3, 5, 2]
    assert pruned_sizes(lab[:, None, :], shape, keep_of(lab, kept)) == [2, 3, 5, 2]  # fewer dims: leading ones
    assert kept_sequence(r, shape, keep_of(lab, kept), ragged=3).tolist() == [1, 4, 6, 7, 9, 10]


def test_heads_keeping_different_counts_are_irregular():
    lab = head_split(3, 4)
    with pytest.raises(Irregular, match="different counts"):
        pruned_sizes(lab, (3, 4), keep_of(lab, [[0, 1], [0, 1, 2], [3, 2]]))


def test_a_removed_head_is_a_whole_slice_of_the_outer_dim():
    lab = head_split(4, 3)
    kept = [[0, 2], [], [1, 2], []]
    assert pruned_sizes(lab, (4, 3), keep_of(lab, kept)) == [2, 2]
    assert kept_sequence(lab, (4, 3), keep_of(lab, kept), ragged=1).tolist() == [1, 3, 8, 9]
    # NONE and FROZEN labels count as kept
    lab2 = torch.cat([lab, torch.full((4, 1), NONE), torch.full((4, 1), FROZEN)], dim=1)
    kept2 = [[0, 2], [1, 2], [0, 1], [2, 0]]
    assert pruned_sizes(lab2, (4, 5), keep_of(lab, kept2)) == [4, 4]
    with pytest.raises(Irregular):  # a removed head keeps its NONE and FROZEN entries: 2 against 4
        pruned_sizes(lab2, (4, 5), keep_of(lab, kept))


def test_the_ragged_dim_may_be_an_outer_one():
    """Heads innermost (the head dim moved outwards, as NesT's permute does): told which dim is ragged."""
    lab = head_split(3, 4).T  # (head_dim, heads)
    kept = [[0, 3], [], [1, 3]]
    keep = keep_of(head_split(3, 4), kept)
    assert pruned_sizes(lab, (4, 3), keep, ragged=0) == [2, 2]
    # pruned tensor (2, 2): element [j, h] is head h's j-th kept channel
    assert kept_sequence(lab, (4, 3), keep, ragged=0).tolist() == [1, 10, 4, 12]
    with pytest.raises(Irregular):  # innermost by default: the head-dim rows keep 1 or 2 heads
        pruned_sizes(lab, (4, 3), keep)


def test_whole_slices_on_outer_dims_or_irregular():
    lab = torch.arange(1, 9).reshape(2, 2, 2)
    keep = torch.zeros(9, dtype=torch.bool)
    keep[lab[0, 0]] = True
    keep[lab[1, 1]] = True  # diagonal blocks: each outer slice has something, the kept set is no block
    with pytest.raises(Irregular, match="regular block"):
        pruned_sizes(lab, (2, 2, 2), keep)
    keep[lab[0, 1]] = keep[lab[1, 0]] = True
    keep[lab[:, :, 1]] = False
    assert pruned_sizes(lab, (2, 2, 2), keep) == [2, 2, 1]


def test_channels_all_removed_or_none_at_all():
    keep = torch.tensor([True, False, True])
    assert pruned_sizes(constant(NONE, 2), (3, 4), keep) == [3, 4]  # no channel: unchanged
    assert pruned_sizes(constant(FROZEN, 2), (3, 4), keep) == [3, 4]
    assert pruned_sizes(constant(2, 2), (3, 4), keep) == [3, 4]  # one kept unit broadcast everywhere
    with pytest.raises(Irregular, match="all removed"):
        pruned_sizes(constant(1, 2), (3, 4), keep)
    lab = torch.tensor([1, 1, 2])  # a dim whose channels are all removed is size 0, not an error
    assert pruned_sizes(lab, (3,), torch.tensor([True, False, False])) == [0]


def test_dims_names_the_channel_dims():
    """``dims``: which dims are channel dims; one of real size 1 can hold a channel (a slice of one channel)."""
    keep = torch.tensor([True, False, True])
    one = torch.tensor([1])  # channel 1 alone along a dim of size 1
    with pytest.raises(Irregular):  # not varying: by default not a channel dim
        pruned_sizes(one, (1,), keep)
    assert pruned_sizes(one, (1,), keep, dims=[0]) == [0]
    assert pruned_sizes(torch.tensor([2]), (1,), keep, dims=[0]) == [1]
    # a dim the labels are reduced over (size 1, real size 4) is no channel dim, even when named
    lab = head_split(1, 3)  # (1, 3): units 1, 2, 3
    keep = torch.tensor([True, True, False, True])
    assert pruned_sizes(lab, (4, 3), keep, dims=[0, 1]) == [4, 2]
    assert pruned_sizes(lab, (4, 3), keep, dims=[1]) == pruned_sizes(lab, (4, 3), keep) == [4, 2]


@SETTINGS
@given(heads=st.integers(1, 5), head_dim=st.integers(1, 6), outer=st.lists(st.integers(1, 3), max_size=2),
       regular=st.booleans(), data=st.data())
def test_head_split_against_brute_force(heads, head_dim, outer, regular, data):
    """Any keep mask of a (heads, head_dim) split with batch-like dims before it; half the time every kept
    head keeps the same count (the regular case: shape (heads kept, count), the kept labels head by head)."""
    lab = head_split(heads, head_dim)
    if regular:
        count = data.draw(st.integers(1, head_dim))
        row = [True] * count + [False] * (head_dim - count)
        mask = [data.draw(st.permutations(row)) if h == 0 or data.draw(st.booleans()) else [False] * head_dim
                for h in range(heads)]
    else:
        mask = data.draw(st.lists(st.lists(st.booleans(), min_size=head_dim, max_size=head_dim),
                                  min_size=heads, max_size=heads))
    kept = [[j for j in range(head_dim) if mask[h][j]] for h in range(heads)]
    heads_kept = [h for h in range(heads) if kept[h]]
    counts = {len(k) for k in heads_kept and [kept[h] for h in heads_kept]}
    keep = keep_of(lab, kept)
    shape = (*outer, heads, head_dim)
    r = lab.reshape((1,) * len(outer) + (heads, head_dim))  # reduced over the outer dims
    # the reference
    if heads > 1 and head_dim > 1:  # both dims are channel dims; head_dim is the ragged one
        expected = [*outer, len(heads_kept), counts.pop() if counts else 0] if len(counts) <= 1 else Irregular
    elif heads > 1:  # one channel per head: the heads dim is the only channel dim
        expected = [*outer, len(heads_kept), 1]
    elif head_dim > 1:
        expected = [*outer, 1, len(kept[0])]
    else:  # a single channel broadcast over the whole tensor
        expected = [*outer, 1, 1] if kept[0] else Irregular
    if expected is Irregular:
        with pytest.raises(Irregular):
            pruned_sizes(r, shape, keep)
        return
    assert pruned_sizes(r, shape, keep) == expected
    assert pruned_sizes(r, shape, keep, dims=[len(outer), len(outer) + 1]) == \
        [*outer, len(heads_kept), expected[-1] if head_dim > 1 else int(bool(heads_kept))]
    if heads > 1 and head_dim > 1 and heads_kept:
        seq = [int(lab[h, j]) for h in heads_kept for j in kept[h]]
        assert kept_sequence(r, shape, keep, ragged=len(outer) + 1).tolist() == seq
