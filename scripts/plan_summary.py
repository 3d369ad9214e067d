"""One line about a `shardc plan --format json` document (for scripts/bench_plan.sh)."""
import json
import sys

p = json.load(open(sys.argv[1]))
s = p.get("search", {})
m = p["memory_per_device"]
setup = p["setup"]
print(
    "    dp={dp} tp={tp} ZeRO-{zero} SP={sp}: predicted step {t:.2f} s, {mem:.1f} GiB/device, "
    "{n} collectives; e-graph {e} nodes over {ops} forward ops, {l} layers stamped".format(
        dp=setup["dp"], tp=setup["tp"], zero=setup["zero"], sp="on" if setup["sequence_parallel"] else "off",
        t=p["predicted_step_seconds"], mem=m["total"] / 2**30, n=len(p["collectives"]),
        e=s.get("enodes"), ops=s.get("searched_nodes"), l=s.get("layers_stamped"),
    )
)
