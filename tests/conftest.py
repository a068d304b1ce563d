import matplotlib
import pytest
import torch

matplotlib.use('Agg')
torch.set_num_threads(1)  # CI has 2 cores; tiny models run faster single-threaded


@pytest.fixture(autouse=True)
def _seed_and_close_figures():
    torch.manual_seed(0)
    yield
    import matplotlib.pyplot as plt
    plt.close('all')
