"""tests/conftest.py's --deal, which .ci/run uses to split parametrized cases between its two
interpreters: every case must run on exactly one share, every function on all of them."""

import collections
import random

import pytest

import conftest


class _Item:
  def __init__(self, nodeid, *markers):
    self.nodeid, self._markers = nodeid, markers

  def get_closest_marker(self, name):
    return name if name in self._markers else None


def _items(seed):
  rng = random.Random(seed)
  items = []
  for f in range(30):
    n = rng.randint(1, 6)
    marks = ("split_cases",) + (("skipif",) if f % 7 == 3 else ())
    if f % 5 == 4:
      marks = ()
    ids = [f"tests/test_x.py::test_{f}"] if n == 1 else [
        f"tests/test_x.py::test_{f}[{c}]" for c in range(n)]
    items += [_Item(i, *marks) for i in ids]
  return items


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_deal_runs_each_case_once_and_every_function_everywhere(n, seed):
  items = _items(seed)
  runs = collections.Counter()
  for i in range(1, n + 1):
    dropped, kept = conftest._dealt(items, i, n)
    assert len(dropped) + len(kept) == len(items)
    assert [x for x in items if x in kept] == kept  # collection order kept
    funcs = {x.nodeid.split("[")[0] for x in kept}
    assert funcs == {x.nodeid.split("[")[0] for x in items}
    runs.update(x.nodeid for x in kept)
  cases = collections.Counter(x.nodeid.split("[")[0] for x in items)
  for x in items:
    func = x.nodeid.split("[")[0]
    dealt = x.get_closest_marker("split_cases") and not x.get_closest_marker("skipif")
    if not dealt:
      assert runs[x.nodeid] == n  # unmarked or skipif: every share runs it
    elif cases[func] >= n:
      assert runs[x.nodeid] == 1
  for func, count in cases.items():
    members = [x for x in items if x.nodeid.split("[")[0] == func]
    if members[0].get_closest_marker("split_cases") and not members[0].get_closest_marker(
        "skipif"):
      # each share runs one case of a function with fewer cases than shares
      assert sum(runs[x.nodeid] for x in members) == max(count, n)
  # the shares are about even: no share keeps more than 60% of the dealt cases
  dealt_ids = [x.nodeid for x in items if x.get_closest_marker("split_cases")
               and not x.get_closest_marker("skipif") and cases[x.nodeid.split("[")[0]] >= n]
  shares = [len(set(x.nodeid for x in conftest._dealt(items, i, n)[1]) & set(dealt_ids))
            for i in range(1, n + 1)]
  assert max(shares) <= 0.6 * len(dealt_ids) + 3


class _Config:
  def __init__(self, value):
    self.value = value

  def getoption(self, name):
    return self.value


@pytest.mark.parametrize("value", ["1", "0/2", "3/2", "a/b"])
def test_bad_share_is_a_usage_error(value):
  with pytest.raises(pytest.UsageError, match="--deal"):
    conftest._parse_share(_Config(value), "--deal")
  assert conftest._parse_share(_Config("2/2"), "--deal") == (2, 2)
  assert conftest._parse_share(_Config(None), "--deal") is None
