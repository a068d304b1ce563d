"""Elastic restarts for real: `torchrun --max-restarts 1` with a rank SIGKILLed mid-epoch; the restarted group
continues from the last checkpoint (`resume='auto'`) and ends with the weights of a run never interrupted."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import same_weights

SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from helpers import linear_data
    from minilearn.callbacks.checkpoint import CheckpointCallback
    from minilearn.callbacks.distributed import DistributedCallback
    from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
    from minilearn.learner import Callback, Learner

    torch.set_num_threads(1)
    out, kill = Path(sys.argv[1]), sys.argv[2] == 'kill'
    rank, attempt = int(os.environ['RANK']), int(os.environ['TORCHELASTIC_RESTART_COUNT'])


    class KillRank1(Callback):
        """On the first attempt, rank 1 dies outright (SIGKILL: no handler, no cleanup) inside epoch 2's 6th batch."""
        def after_pred(self):
            if kill and attempt == 0 and rank == 1 and self.run.in_train and (self.run.epoch, self.run.iter) == (1, 5):
                os.kill(os.getpid(), signal.SIGKILL)


    torch.manual_seed(rank)  # each rank its own draws; DDP broadcasts rank 0's initial weights
    data = linear_data(n_train=128, n_valid=32, bs=8)  # 64 items, 8 batches per rank and epoch
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    learn = Learner(model, data, nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, path=out,
                    cbs=[DistributedCallback(), CheckpointCallback('ckpt', every_n_batches=3, keep=2), KillRank1()],
                    cb_funcs=[lambda: AvgStatsCallback([accuracy])])
    learn.logger = lambda *args: None
    learn.fit_one_cycle(3, resume='auto')
    if rank == 0:
        torch.save(learn.model.state_dict(), out / 'final.pt')
        (out / 'run.json').write_text(json.dumps({{'attempt': attempt, 'position': list(learn.position.__dict__.values()),
                                                   'lr': learn.opt.param_groups[0]['lr']}}))
''')


def torchrun(script, out, mode, *options):
    out.mkdir()
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *options,
               str(script), str(out), mode]
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'OMP_NUM_THREADS': '1'}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'torchrun {mode} did not finish within 300 s: {(e.stderr or b"")[-3000:]!r}')
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((out / 'run.json').read_text()), torch.load(out / 'final.pt', weights_only=True), done.stderr


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == 'win32' or not torch.distributed.is_available(),
                    reason='torchrun with gloo on a POSIX system')
def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_the_run_ends_as_if_never_interrupted(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    straight, straight_weights, _ = torchrun(script, tmp_path / 'straight', 'straight')
    assert straight['attempt'] == 0 and straight['position'] == [0, 0]
    killed, killed_weights, log = torchrun(script, tmp_path / 'killed', 'kill', '--max-restarts', '1')
    # the restarted group (attempt 1) continued from the checkpoint after batch 4 of epoch 1 (index 1)
    assert killed['attempt'] == 1 and killed['position'] == [1, 4], log[-3000:]
    assert same_weights(killed_weights, straight_weights)
    assert killed['lr'] == straight['lr'] == 0.1
