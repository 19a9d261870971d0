"""SiteStats: one neuron site's statistics as a mergeable state (batches, documents, ranks, checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

HIST_BINS = 64
_FLOAT_FIELDS = ("n_all", "n_cat", "sums", "sums_sq", "word_n", "word_sums", "word_sumsq")
_COUNT_FIELDS = ("hist_all", "hist_group")
_SHARED_FIELDS = ("shared_n", "shared_sums", "shared_sumsq")  # rows per group of shared tokens, as many as shared_keys
_HASH_MULTIPLIER = 0x9E3779B97F4A7C15 - 2**64  # golden-ratio mixing, as a signed int64


@dataclass(frozen=True)
class StatsLayout:
    """What a site's statistics hold. Every shard of a scan uses the same layout, so their states merge."""

    n_neurons: int
    n_categories: int
    n_words: int = 0  # word-level sums for the word permutation test (0: off)
    n_folds: int = 1  # histograms per category are kept per fold of its words (cv_auroc, binned)
    top_k: int = 0  # highest activations per neuron, with their token keys
    hist_bins: int = 0  # per-neuron histograms on agreed edges (binned AUROC); 0: off
    sample_bands: int = 0  # quantile bands for sampled examples (0: off)
    samples_per_band: int = 0


@dataclass
class LabelIndex:
    """Where a batch's category and word tokens are, found once per batch: for a batch going to a GPU, on the host
    before it moves, so the hooks there run no nonzero() or unique() (each of which waits for the GPU)."""

    category_rows: torch.Tensor  # [K] the tokens in at least one category
    pair_token: torch.Tensor  # [P] each (token, category) pair of them: the token's place in category_rows
    pair_category: torch.Tensor  # [P] and the category
    pair_fold: torch.Tensor  # [P] the fold of the token's word in that category (-1: none; 0 without folds)
    word_rows: torch.Tensor | None = None  # [K_w] the token of each (token, word) membership (None: no word labels)
    words: torch.Tensor | None = None  # [U] the distinct words among them, ascending
    word_slot: torch.Tensor | None = None  # [K_w] each membership's word, as its place in words
    shared_rows: torch.Tensor | None = None  # [K_s] the tokens that words of different texts share (BatchLabels.shared)
    shared_slot: torch.Tensor | None = None  # [K_s] and their group, as its place in shared_groups
    shared_groups: tuple[int, ...] | None = None  # the groups among them, as rows of BatchLabels.shared_keys (host ints)

    def to(self, device: torch.device) -> LabelIndex:
        return LabelIndex(*(_moved(t, device) if isinstance(t, torch.Tensor) else t for t in vars(self).values()))


def label_index(
    category_mask: torch.Tensor, word: torch.Tensor | None, fold: torch.Tensor | None, shared: torch.Tensor | None = None
) -> LabelIndex:
    """The LabelIndex of a batch's labels, computed where they are."""
    in_category = category_mask > 0
    rows = torch.nonzero(in_category.any(dim=1)).view(-1)
    pair_token, pair_category = torch.nonzero(in_category.index_select(0, rows), as_tuple=True)
    if fold is None:
        pair_fold = torch.zeros_like(pair_token)
    else:
        pair_fold = fold.index_select(0, rows)[pair_token, pair_category]
    if word is None:
        return LabelIndex(rows, pair_token, pair_category, pair_fold)
    word = word[:, None] if word.dim() == 1 else word  # [T, C]: a token in words of two categories counts in both
    word_rows, word_column = torch.nonzero(word >= 0, as_tuple=True)
    words, word_slot = torch.unique(word[word_rows, word_column], return_inverse=True)
    if shared is None:
        return LabelIndex(rows, pair_token, pair_category, pair_fold, word_rows, words, word_slot)
    shared_rows = torch.nonzero(shared >= 0).view(-1)
    groups, shared_slot = torch.unique(shared.index_select(0, shared_rows), return_inverse=True)
    return LabelIndex(rows, pair_token, pair_category, pair_fold, word_rows, words, word_slot, shared_rows, shared_slot,
                      tuple(groups.tolist()))  # fmt: skip


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on device; from the host to a CUDA GPU through pinned memory, so the copy does not wait for the GPU."""
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


_PER_TOKEN = ("category_mask", "keys", "word", "fold", "shared")  # BatchLabels' fields with a row per token


@dataclass
class BatchLabels:
    """What a batch's counted tokens are, on one device. T tokens."""

    category_mask: torch.Tensor  # [T, C] float32: 1 where the token belongs to the category
    keys: torch.Tensor  # [T] int64: a token's unique, stable key (its token index or document and position)
    word: torch.Tensor | None = None  # [T, C] (or [T]) int64: the token's word (coverage row) in each category, -1 none
    fold: torch.Tensor | None = None  # [T, C] int64: the fold of the token's word in each category, -1 outside
    shared: torch.Tensor | None = None  # [T] int64: the token's group among shared_keys (stats.shared_token_groups), -1 none
    shared_keys: torch.Tensor | None = None  # [G, C] int64 on the CPU: each group's words (a token_word row)
    _copies: dict = field(default_factory=dict, repr=False, compare=False)  # device -> these labels there
    _index: LabelIndex | None = field(default=None, repr=False, compare=False)

    def index(self) -> LabelIndex:
        """Where the category and word tokens are (computed once, where the labels are)."""
        if self._index is None:
            self._index = label_index(self.category_mask, self.word, self.fold, self.shared)
        return self._index

    def on(self, device: torch.device) -> BatchLabels:
        """These labels on a site's device, moved once per device (a model spread over devices has several)."""
        if device not in self._copies:
            self._copies[device] = self.to(device)
        return self._copies[device]

    def select(self, rows: torch.Tensor) -> BatchLabels:
        """The labels of some of the tokens (rows [t] indices), e.g. those routed to one expert."""
        pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        return BatchLabels(*(pick(getattr(self, name)) for name in _PER_TOKEN), shared_keys=self.shared_keys)

    def to(self, device: torch.device) -> BatchLabels:
        """These labels, with their index found here first (on the host, for a batch bound for a GPU), on device."""
        tensors = (getattr(self, name) for name in _PER_TOKEN)
        moved = (None if t is None else _moved(t, device) for t in tensors)
        return BatchLabels(*moved, shared_keys=self.shared_keys, _index=self.index().to(device))


def token_priority(keys: torch.Tensor) -> torch.Tensor:
    """A pseudo-random priority in [0, 1) fixed by each token's key: the same on every rank and run."""
    mixed = keys * _HASH_MULTIPLIER  # int64 wrap-around multiply
    mixed = mixed ^ (mixed >> 31)
    return (mixed & 0xFFFFFF).double() / float(0x1000000)


def _group_sums(values: torch.Tensor, group: torch.Tensor, n_groups: int, one_hot: bool | None = None) -> torch.Tensor:
    """[n_groups, N]: the sum of the rows of values [R, N] in each group (group [R]). On a CPU by index_add_
    (under an eighth of a one-hot matmul's time there: MiniLM's category and word sums, 6.3 -> 0.7 ms a layer at
    1 thread); elsewhere (or with one_hot) by a one-hot matmul, since a GPU's index_add_ adds floats in a racing
    order, so its sums would change in the last bits from run to run."""
    if one_hot is None:
        one_hot = values.device.type != "cpu"
    if not one_hot:
        return torch.zeros(n_groups, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, group, values)
    members = torch.zeros(n_groups, len(group), dtype=values.dtype, device=values.device)
    members[group, torch.arange(len(group), device=values.device)] = 1.0
    return members @ values


def _add_centred_sums(into: tuple, rows: torch.Tensor, centred: torch.Tensor, token_rows, slot, shift) -> None:
    """Add the count, sum and sum of squares of some tokens (token_rows [K] of centred [T, N], the float32 values less
    shift; slot [K]: each one's place in rows) into rows of into's (counts [R], sums [R, N], sums of squares [R, N]):
    float32 sums of the centred values, the shift undone in float64 (a word's or a group of shared tokens')."""
    counts, sums, sums_sq = into
    wide, values = sums.dtype, centred.index_select(0, token_rows)  # [K, N]
    n = _group_sums(torch.ones(len(slot), 1, dtype=wide, device=centred.device), slot, len(rows))
    total, total_sq = _shifted_back(
        n, _group_sums(values, slot, len(rows)).to(wide), _group_sums(values * values, slot, len(rows)).to(wide), shift
    )
    counts.index_add_(0, rows, n[:, 0])
    sums.index_add_(0, rows, total)
    sums_sq.index_add_(0, rows, total_sq)


def _shifted_back(count, centred_sum, centred_sumsq, shift):
    """(sum, sum of squares) of values x = c + shift, from the count, sum and sum of squares of the centred
    c (float64, so the float32 sums of c keep a spread that a large mean would swamp)."""
    return centred_sum + count * shift, centred_sumsq + 2 * shift * centred_sum + count * shift * shift


class SiteStats:
    """Counts, sums, sums of squares, word sums, histograms, top-k and quantile samples of one site.

    Lives on the site's device; update() runs inside the hook under inference mode. merge() is exact and
    associative: sums add, histograms add (edges must agree), top-k keep the k largest values (ties by
    smaller key), samples keep each band's lowest-priority tokens. state_dict()/from_state_dict()
    round-trip through torch.save for checkpoints and for gathering across ranks.
    """

    def __init__(self, layout: StatsLayout, device: torch.device | str, edges: torch.Tensor | None = None):
        self.layout = layout
        device = torch.device(device)
        acc = torch.float32 if device.type == "mps" else torch.float64
        n, c, w = layout.n_neurons, layout.n_categories, layout.n_words
        zeros = lambda *shape, dtype=acc: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.n_all = zeros(())
        self.n_cat = zeros(c)
        self.sums = zeros(1 + c, n)  # row 0: all tokens, then each category
        self.sums_sq = zeros(1 + c, n)
        self.word_n = zeros(w)
        self.word_sums = zeros(w, n)
        self.word_sumsq = zeros(w, n)
        # the tokens that words of different texts share, per group (stats.shared_token_groups), found as they come:
        # a corpus's documents, or another rank's, may hold groups this state has not seen
        self.shared_keys = torch.zeros(0, c, dtype=torch.long)  # [G, C] on the CPU: each group's token_word row
        self.shared_n = zeros(0)
        self.shared_sums = zeros(0, n)
        self.shared_sumsq = zeros(0, n)
        self.top_vals = torch.empty(0, n, device=device)  # [k, N] float32, descending
        self.top_keys = torch.empty(0, n, dtype=torch.long, device=device)
        bins = layout.hist_bins
        self.hist_edges = None if edges is None else edges.to(device)  # [N, bins - 1], set by the first batch
        self.hist_all = zeros(n, bins, dtype=torch.long)
        self.hist_group = zeros(c * layout.n_folds, n, bins, dtype=torch.long)  # category-major, then fold
        slots = layout.sample_bands * layout.samples_per_band
        self.sample_priority = torch.full((slots, n), float("inf"), dtype=torch.float64, device=device)
        self.sample_keys = torch.full((slots, n), -1, dtype=torch.long, device=device)
        self.sample_vals = torch.zeros(slots, n, device=device)

    @property
    def device(self) -> torch.device:
        return self.sums.device

    # ---- streaming ------------------------------------------------------------------------------

    def update(self, acts: torch.Tensor, labels: BatchLabels) -> None:
        """Add a batch: acts [T, N] float32 on this state's device, labels on the same device."""
        cat_mask, index = labels.category_mask, labels.index()
        wide = self.sums.dtype
        self.n_all += acts.shape[0]
        self.n_cat += cat_mask.sum(0).to(self.n_cat.dtype)
        # All tokens: float32 sums of activations centred on the batch mean, the shift undone in float64, so a
        # neuron whose mean dwarfs its spread keeps its variance (raw float32 squares would lose it).
        shift = acts.mean(dim=0)  # [N]
        centred = acts - shift
        shift = shift.to(wide)
        total, total_sq = _shifted_back(
            float(acts.shape[0]), centred.sum(dim=0).to(wide), (centred * centred).sum(dim=0).to(wide), shift
        )
        self.sums[0] += total
        self.sums_sq[0] += total_sq
        # Category tokens (a minority): each (token, category) pair's value and square added in float64, exact for
        # a category's few tokens.
        rows = index.category_rows
        if len(rows):
            values = acts.index_select(0, rows.index_select(0, index.pair_token)).to(wide)  # [P, N]: one gather
            self.sums[1:] += _group_sums(values, index.pair_category, len(self.n_cat))
            self.sums_sq[1:] += _group_sums(values * values, index.pair_category, len(self.n_cat))
        if self.layout.n_words and labels.word is not None:
            if len(index.word_rows):  # per word present
                _add_centred_sums((self.word_n, self.word_sums, self.word_sumsq), index.words, centred, index.word_rows,
                                  index.word_slot, shift)  # fmt: skip
            if labels.shared is not None and len(index.shared_rows):  # a group's tokens once, beside their words
                rows = self._add_groups(labels.shared_keys[list(index.shared_groups)])  # first: it grows the tables
                _add_centred_sums((self.shared_n, self.shared_sums, self.shared_sumsq), rows, centred, index.shared_rows,
                                  index.shared_slot, shift)  # fmt: skip
        layout = self.layout
        if not (layout.top_k or layout.hist_bins or layout.sample_bands):
            return
        acts_t = acts.T.contiguous()  # [N, T]: top-k, histograms and samples work along its rows
        if layout.top_k:
            self._update_top(acts_t, labels.keys)
        if layout.hist_bins:
            ordered = sorted_rows(acts_t) if self.hist_edges is None or sorts_rows_to_bin(acts_t.device) else None
            if self.hist_edges is None:
                self.hist_edges = quantile_edges(ordered, layout.hist_bins)
            self._update_histograms(acts_t, ordered, index)
        if layout.sample_bands:
            self._update_samples(acts_t, labels.keys)

    def _add_groups(self, keys: torch.Tensor) -> torch.Tensor:
        """This state's row of each group of shared tokens keys [U, C] names (on the CPU), new groups added as zero
        rows; the rows on this state's device, sent without waiting for it (_moved)."""
        known = {tuple(key): row for row, key in enumerate(self.shared_keys.tolist())}
        new = [key for key in dict.fromkeys(map(tuple, keys.tolist())) if key not in known]
        if new:
            known.update({key: len(self.shared_keys) + i for i, key in enumerate(new)})
            self.shared_keys = torch.cat([self.shared_keys, torch.tensor(new, dtype=torch.long)])
            for name in _SHARED_FIELDS:
                grown = getattr(self, name)
                setattr(self, name, torch.cat([grown, grown.new_zeros(len(new), *grown.shape[1:])]))
        return _moved(torch.tensor([known[tuple(key)] for key in keys.tolist()]), self.device)

    def _update_top(self, acts_t: torch.Tensor, keys: torch.Tensor) -> None:
        k = min(self.layout.top_k, acts_t.shape[1])
        if acts_t.device.type != "cpu":  # topk ranks NaN (and inf) highest: rank them lowest (finish drops them), on a
            vals, rows = torch.topk(finite_or_lowest(acts_t), k, dim=1)  # GPU with no check, which would wait for it
        else:  # on a CPU, look again only when the top values hold one
            vals, rows = torch.topk(acts_t, k, dim=1)  # [N, k]
            if not torch.isfinite(vals).all():
                vals, rows = torch.topk(finite_or_lowest(acts_t), k, dim=1)
        self.top_vals, self.top_keys = _keep_top(
            torch.cat([self.top_vals, vals.T]), torch.cat([self.top_keys, keys[rows].T]), self.layout.top_k
        )

    def _update_histograms(self, acts_t: torch.Tensor, ordered: torch.Tensor | None, index: LabelIndex) -> None:
        """All tokens: with each neuron's sorted row (ordered), the bin edges located in it; without (a GPU,
        sorts_rows_to_bin), each value binned and counted. Category tokens (few): binned one by one, per
        category and fold. A value equal to an edge counts in the bin above."""
        n_neurons, n_tokens = acts_t.shape
        bins = self.layout.hist_bins
        if ordered is not None:
            below = torch.searchsorted(ordered, self.hist_edges)  # [N, bins - 1]: tokens under each edge
            self.hist_all += torch.cat([below.new_zeros(n_neurons, 1), below, below.new_full((n_neurons, 1), n_tokens)], 1).diff(1)
        else:
            all_bins = self._flat_bins(acts_t).view(-1)
            self.hist_all.view(-1).index_add_(0, all_bins, self.hist_all.new_ones(1).expand(len(all_bins)))
        if not len(index.category_rows):
            return
        flat_bins = self._flat_bins(acts_t.index_select(1, index.category_rows))  # [N, K]
        n_folds, cells = self.layout.n_folds, n_neurons * bins
        group = index.pair_category * n_folds  # every (token, category) pair lands in its category's group
        counts = torch.ones_like(group)
        if n_folds > 1:  # and there in the fold of the token's word; a pair whose word has no fold counts 0
            group = group + index.pair_fold.clamp(min=0)
            counts = (index.pair_fold >= 0).long()
        pairs = flat_bins.index_select(1, index.pair_token) + (group * cells)[None, :]  # [N, P]: one flat index each
        # index_add_, not bincount: on a GPU bincount reads the indices' minimum and maximum back to the host
        self.hist_group.view(-1).index_add_(0, pairs.view(-1), counts.expand_as(pairs).reshape(-1))

    def _flat_bins(self, values: torch.Tensor) -> torch.Tensor:
        """[N, K] int32: each value's cell in the flattened [N, bins] histogram (its row's bin above the edges
        at or below it). int32 halves the memory of int64 positions; index_add_ takes either."""
        n_neurons, bins = values.shape[0], self.layout.hist_bins
        flat = torch.searchsorted(self.hist_edges, values.contiguous(), right=True, out_int32=True)
        flat += torch.arange(0, n_neurons * bins, bins, dtype=torch.int32, device=values.device)[:, None]
        return flat

    def _update_samples(self, acts_t: torch.Tensor, keys: torch.Tensor) -> None:
        """Per neuron and activation band (quantiles of the edges), the tokens of lowest priority."""
        edges = self.band_edges()
        if edges is None:
            return
        priority = token_priority(keys)
        worst = self.sample_priority.max()  # inf while a slot is empty
        if torch.isfinite(worst):  # a token above every slot's priority can enter none: after warm-up, most
            candidates = torch.nonzero(priority <= worst).view(-1)
            if not len(candidates):
                return
            acts_t, keys, priority = acts_t.index_select(1, candidates), keys[candidates], priority[candidates]
        band = torch.searchsorted(edges, acts_t.contiguous(), right=True)  # [N, T]
        priority = priority[None, :].expand_as(band)
        per_band = self.layout.samples_per_band
        for b in range(self.layout.sample_bands):
            rows = slice(b * per_band, (b + 1) * per_band)
            candidate = torch.where(band == b, priority, torch.full_like(priority, float("inf")))  # [N, T]
            merged_p = torch.cat([self.sample_priority[rows], candidate.T])
            merged_k = torch.cat([self.sample_keys[rows], keys[:, None].expand(-1, acts_t.shape[0])])
            merged_v = torch.cat([self.sample_vals[rows], acts_t.T])
            take = torch.topk(merged_p, per_band, dim=0, largest=False).indices
            self.sample_priority[rows] = merged_p.gather(0, take)
            self.sample_keys[rows] = merged_k.gather(0, take)
            self.sample_vals[rows] = merged_v.gather(0, take)

    def band_edges(self) -> torch.Tensor | None:
        """[N, bands - 1] activation-band edges: every (bins / bands)-th histogram edge."""
        if self.hist_edges is None or not self.layout.sample_bands:
            return None
        step = self.layout.hist_bins // self.layout.sample_bands
        return self.hist_edges[:, step - 1 :: step][:, : self.layout.sample_bands - 1].contiguous()

    # ---- merging --------------------------------------------------------------------------------

    def merge(self, other: SiteStats) -> SiteStats:
        """A new state holding both: exact and associative (and commutative up to float rounding of sums)."""
        if self.layout != other.layout:
            raise ValueError(f"cannot merge statistics of different layouts: {self.layout} and {other.layout}")
        other = other.to(self.device)
        edges = self.hist_edges if self.hist_edges is not None else other.hist_edges
        if self.layout.hist_bins and self.hist_edges is not None and other.hist_edges is not None:
            if not torch.equal(self.hist_edges, other.hist_edges):
                raise ValueError("cannot merge histograms on different bin edges: the shards must agree on edges")
        out = SiteStats(self.layout, self.device, edges)
        for name in _FLOAT_FIELDS + _COUNT_FIELDS:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.shared_keys, row_of = torch.unique(torch.cat([self.shared_keys, other.shared_keys]), dim=0, return_inverse=True)
        for name in _SHARED_FIELDS:  # each side's groups added into the row of their key
            rows = torch.cat([getattr(self, name), getattr(other, name)])
            setattr(out, name, rows.new_zeros(len(out.shared_keys), *rows.shape[1:]).index_add_(0, row_of.to(self.device), rows))
        out.top_vals, out.top_keys = _keep_top(
            torch.cat([self.top_vals, other.top_vals]), torch.cat([self.top_keys, other.top_keys]), self.layout.top_k
        )
        per_band = self.layout.samples_per_band
        for b in range(self.layout.sample_bands):
            rows = slice(b * per_band, (b + 1) * per_band)
            merged_p = torch.cat([self.sample_priority[rows], other.sample_priority[rows]])
            take = _lowest_first(merged_p, torch.cat([self.sample_keys[rows], other.sample_keys[rows]]))[:per_band]
            for name in ("sample_priority", "sample_keys", "sample_vals"):
                both = torch.cat([getattr(self, name)[rows], getattr(other, name)[rows]])
                getattr(out, name)[rows] = both.gather(0, take)
        return out

    def to(self, device: torch.device | str) -> SiteStats:
        """This state on another device (itself when already there)."""
        if torch.device(device) == self.device:
            return self
        return SiteStats.from_state_dict(self.state_dict(), device)

    def state_dict(self) -> dict:
        """Plain tensors on the CPU and the layout: what a checkpoint or a gather sends."""
        names = _FLOAT_FIELDS + _COUNT_FIELDS + _SHARED_FIELDS + ("shared_keys", "top_vals", "top_keys", "sample_priority",
                                                                 "sample_keys", "sample_vals")
        state = {name: getattr(self, name).detach().cpu() for name in names}
        state["hist_edges"] = None if self.hist_edges is None else self.hist_edges.cpu()
        state["layout"] = asdict(self.layout)
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> SiteStats:
        out = cls(StatsLayout(**state["layout"]), device, state["hist_edges"])
        for name, value in state.items():
            if name not in ("layout", "hist_edges"):
                setattr(out, name, value if name == "shared_keys" else value.to(out.device))
        return out


def merge_all(states: list[SiteStats]) -> SiteStats:
    """Fold merge over a list of states (at least one)."""
    merged = states[0]
    for state in states[1:]:
        merged = merged.merge(state)
    return merged


def quantile_edges(ordered: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-mass bin edges [N, bins - 1] from rows sorted ascending [N, T]; the end bins are open. Each edge lies
    halfway between two neighbouring values, not on one: a value on an edge would change bins with a rounding
    difference of the forward pass (another batch's padding), and shards of one scan would disagree."""
    at = torch.linspace(0, ordered.shape[1] - 1, bins + 1, device=ordered.device)[1:-1].round().long()
    above = (at + 1).clamp(max=ordered.shape[1] - 1)
    return ((ordered.index_select(1, at) + ordered.index_select(1, above)) / 2).contiguous()


def _lowest_first(priority: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Row order [M, N] by ascending priority, ties by ascending key (deterministic in any merge order)."""
    by_key = torch.sort(keys, dim=0, stable=True).indices
    by_priority = torch.sort(priority.gather(0, by_key), dim=0, stable=True).indices
    return by_key.gather(0, by_priority)


def finite_or_lowest(values: torch.Tensor) -> torch.Tensor:
    """values with every inf and NaN made -inf, for top-k (torch.topk ranks NaN highest; finish.assemble drops the
    -inf rows): an overflowed value is no activation to rank."""
    return torch.where(torch.isfinite(values), values, torch.tensor(float("-inf"), dtype=values.dtype, device=values.device))


def _keep_top(vals: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of vals [M, N] per column with their keys, descending; ties keep the smaller key."""
    order = _lowest_first(-vals.double(), keys)[:k]
    return vals.gather(0, order), keys.gather(0, order)


def sorts_rows_to_bin(device: torch.device) -> bool:
    """Whether the histogram update bins all tokens through each neuron's sorted row (the CPU, where numpy
    sorts a row faster than torch searches it) or by searching each value among the edges (a GPU, where
    that costs a fraction of a sort: on Llama-3-8B the per-batch sorts took as long as the forward pass)."""
    return device.type == "cpu"


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """x sorted along its rows. On the CPU through numpy, whose vectorised sort is several times torch's."""
    if x.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values
