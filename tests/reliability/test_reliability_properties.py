"""Property-based tests over model configurations × input shapes × masks (see _zoo.py and _props.py).

CI profile: a few derandomised examples per property (whole file well under a minute on one core).
``-m fuzz``: the same properties with hundreds of examples each (``scripts/reliability_report.py``
runs them too and records the counts in docs/reliability.md).
"""

from __future__ import annotations

import _props
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CI = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize(("prop", "kind"), _props.PAIRS)
@CI
@given(data=st.data())
def test_property(prop, kind, data):
    _props.PROPERTIES[prop](data, kind)


@pytest.mark.fuzz
@pytest.mark.parametrize(("prop", "kind"), _props.PAIRS)
@FUZZ
@given(data=st.data())
def test_property_fuzz(prop, kind, data):
    _props.PROPERTIES[prop](data, kind)
