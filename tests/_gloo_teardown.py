"""Under torchrun: creates the world as the engine does, then what imports torch._dynamo after it
(an optimiser), closes the world and prints the process's threads (Linux /proc)."""
import os
import sys

if __name__ == "__main__":
    import torch
    assert "torch._dynamo" not in sys.modules, "this check needs torch._dynamo first imported after init_world"
    from datadam_fast.distill.parallel import init_world
    world = init_world("cpu")
    torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)  # imports torch._dynamo
    world.sum_(torch.ones(3))
    world.close()
    task = f"/proc/{os.getpid()}/task"
    names = sorted(open(f"{task}/{t}/comm").read().strip() for t in os.listdir(task))
    print(f"rank {os.environ['RANK']} threads after close: {' '.join(names)}", flush=True)
