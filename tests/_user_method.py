"""The user method of docs/methods.md, extracted from the page (so the page and the tests cannot
drift), and a torchrun entry point that distills with it."""
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def load_user_method(block: str = "channel_attention"):
    """Executes the page's ``block`` code block as a module; returns its namespace."""
    text = DOC.read_text()
    m = re.search(rf"<!-- begin: {block} -->\s*```python\n(.*?)```\s*<!-- end: {block} -->", text, re.S)
    assert m, f"docs/methods.md lost its {block} code block"
    import types
    module = types.ModuleType(f"docs_methods_{block}")
    module.__file__ = str(DOC)
    sys.modules[module.__name__] = module  # torch.compile looks the defining module up
    exec(compile(m.group(1), str(DOC), "exec"), module.__dict__)
    return module.__dict__


from conftest import SMALL_RUN  # noqa: E402

SMALL = dict(SMALL_RUN, log_every=1)

if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... _user_method.py OUT ITERATIONS
    from datadam_fast.distill import DistillConfig, distill
    from datadam_fast.distill.parallel import init_world
    out, iterations = sys.argv[1], int(sys.argv[2])
    world = init_world("cpu")
    distill(DistillConfig(iterations=iterations, checkpoint_every=2, **SMALL), out, progress=False,
            method=load_user_method()["ChannelAttention"](), world=world)
    world.close()
