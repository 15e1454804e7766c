# Tiny test models gain nothing from a second thread, and on a busy 2-core machine the extra thread only waits
# (measured: test_model.py 7 s with one thread, 70 s with torch's default under load).
import torch

torch.set_num_threads(1)
