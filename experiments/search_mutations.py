"""Mutation check of the search tests: applies each one-line wrong search to
icm_jax/search/, runs tests/test_search*.py, restores the file, and prints
KILLED (some test failed) or SURVIVED.

    python experiments/search_mutations.py
"""
import subprocess, sys
P='icm_jax/search/annealing.py'
orig=open(P).read()
CP='icm_jax/search/config.py'
config_orig=open(CP).read()
M={
 "always accept": ("return delta > 0 or u < math.exp(min(delta / temperature, 0.0))", "return True"),
 "accept worse with 1-exp": ("return delta > 0 or u < math.exp(min(delta / temperature, 0.0))", "return delta > 0 or u < 1 - math.exp(min(delta / temperature, 0.0))"),
 "U = aP + I": ("utility = self.config.alpha * p - inconsistency", "utility = self.config.alpha * p + inconsistency"),
 "fix always applies best": ("if utility[c] >= best:", "if True:"),
 ">= becomes >": ("if utility[c] >= best:", "if utility[c] > best:"),
 "skip the official fix": ("    return self._fix_official(labels, current, rng, what)", "    return labels, (current or self.evaluate(labels[None], what)[0])"),
 "skip the hard fix": ("      return self._fix_hard(labels, keep, what)", "      return labels, (current or self.evaluate(labels[None], what)[0])"),
 "hard fix picks the worst": ("      c = int(np.argmax([e.utility for e in evaluations]))\n      labels, current = candidates[c], evaluations[c]\n    if current is None:\n      current = self.evaluate(labels[None], what)[0]\n    return labels, current\n\n  def _fix_unfixed", "      c = int(np.argmin([e.utility for e in evaluations]))\n      labels, current = candidates[c], evaluations[c]\n    if current is None:\n      current = self.evaluate(labels[None], what)[0]\n    return labels, current\n\n  def _fix_unfixed"),
 "flip delta sign": ("delta = evaluation.utility - st.current.utility", "delta = st.current.utility - evaluation.utility"),
 "no forced resolution": ("best = -math.inf if current is None else current.utility", "best = (self.evaluate(labels[None], what)[0].utility if current is None else current.utility)"),
 "stop at first pair": ("        if applied is not None:\n          break\n      if applied is None:", "        break\n      if applied is None:"),
 "no-op counted as flip": ("if fixed is None or np.array_equal(fixed[0], st.labels):", "if fixed is None:"),
 "default fix = unfixed_baseline": (None, None),
}
for name,(a,b) in M.items():
 try:
  if a is None:
    open(CP,'w').write(config_orig.replace('fix: str = "hard"','fix: str = "unfixed_baseline"'))
  else:
    assert orig.count(a)==1, name
    open(P,'w').write(orig.replace(a,b))
  r=subprocess.run([sys.executable,'-m','pytest','-q','-x','-p','no:cacheprovider','tests/test_search.py','tests/test_search_rules.py'],capture_output=True,text=True)
  failed=[l.split('::')[1].split(' ')[0] for l in r.stdout.splitlines() if l.startswith('FAILED')]
  print(f"{name}: {'KILLED' if r.returncode else 'SURVIVED'} {failed}", flush=True)
 finally:
  open(P,'w').write(orig)
  open(CP,'w').write(config_orig)
