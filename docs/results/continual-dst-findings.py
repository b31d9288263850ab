"""Summaries behind the findings of docs/results/continual-dst.md (run from the repository root;
argument: the sweep folder, default runs/sweep-seq-mnist-continual-dst)."""
import json, glob, statistics as st, sys
from collections import defaultdict
root = sys.argv[1] if len(sys.argv) > 1 else 'runs/sweep-seq-mnist-continual-dst'
d = defaultdict(list)
for f in glob.glob(f'{root}/*/result.json'):
    r = json.load(open(f))
    if not r.get('complete'): continue
    mo = r['config']['method_options']
    d[(mo['init'], mo['grow'], mo['sparsity'])].append(r['accuracy']['task_il']['acc'])
m = {k: st.mean(v) for k, v in d.items()}
for sp in (0.8, 0.9, 0.95):
    for init in ('uniform', 'erk'):
        vals = {g: m.get((init, g, sp)) for g in ('random', 'unfired', 'gradient', 'momentum', 'random:2,gradient:3')}
        fixed = [v for g, v in vals.items() if v is not None and ':' not in g]
        print(sp, init, 'mean fixed %.2f range %.2f' % (st.mean(fixed), max(fixed) - min(fixed)), 'adaptive %.2f random %.2f gradient %.2f' % (vals['random:2,gradient:3'], vals['random'], vals['gradient']))
print({k: len(v) for k, v in d.items() if len(v) > 1})
