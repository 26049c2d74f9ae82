"""Notebooks 4-6, with the same checks as tests/test_notebooks.py (see there).

A file of their own so that pytest-xdist (`--dist loadfile`: one file, one worker) runs these
notebooks on the second core while the first half runs on the first.
"""

import pytest
from test_notebooks import SECOND_HALF, execute_notebook
from test_notebooks import test_chapter_quotes_the_notebook_numbers  # noqa: F401  (collected here too)
from test_notebooks import test_notebook_runs  # noqa: F401
from test_notebooks import test_notebooks_draw_plots  # noqa: F401


@pytest.fixture(scope="module", params=SECOND_HALF)
def executed(request):
    return execute_notebook(request.param)
