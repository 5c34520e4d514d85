#!/usr/bin/env python
"""Progress of the mmcv build (tools/setup_env.sh pipes the build log through it): one
line per compiled file as ninja finishes it, with the elapsed time and an estimate of
the time left; error lines pass through. Python (run unbuffered, -u) rather than awk:
Debian's mawk reads a pipe in blocks, so its lines came in bursts.

  MAX_JOBS=J PALE_MM_CUDA_FILES=N python -u build_progress.py < log

PALE_MM_CUDA_FILES: how many of the files are .cu (nvcc) files, 0 in a CPU build. A
.cu file takes several times as long as a C++ file with the precompiled header, and
ninja compiles mmcv's C++ files first, so a CUDA build estimates each kind from the
files of that kind finished so far, and says so while no .cu file has finished.
"""
import os
import re
import sys
import time

STEP = re.compile(r'^\s*\[(\d+)/(\d+)\]\s')
BAD = re.compile(r'error:|Error|FAILED')


def mmss(s):
    s = int(round(s))
    return f'{s // 60}m{s % 60:02d}s'


class Progress:
    def __init__(self, jobs=2, cuda_files=0, clock=time.time):
        self.jobs, self.cuda_files, self.clock = max(1, jobs), cuda_files, clock
        self.t0 = self.last = clock()
        self.done = {'cu': 0, 'cxx': 0}
        self.spent = {'cu': 0.0, 'cxx': 0.0}  # time between finishes, by the kind finished

    def tail(self, k, n, el):
        if k >= n:
            return 'linking'
        if not self.cuda_files:
            # the jobs still running are on average half done
            return f'about {mmss(el * (n - k) / (k + (self.jobs - 1) / 2))} left'
        left = {'cu': self.cuda_files - self.done['cu'],
                'cxx': n - self.cuda_files - self.done['cxx']}
        rate = {x: self.spent[x] / self.done[x] if self.done[x] else None for x in left}
        if left['cu'] > 0 and rate['cu'] is None:
            cxx = f'C++ files about {mmss(left["cxx"] * rate["cxx"])}, then ' \
                if left['cxx'] > 0 and rate['cxx'] is not None else ''
            return f'{cxx}{left["cu"]} .cu files (time not known until one is done)'
        return f'about {mmss(sum(left[x] * rate[x] for x in left if left[x] > 0))} left'

    def line(self, line):
        """The progress line for one line of the build log, or None."""
        m = STEP.match(line)
        if m:
            k, n = int(m.group(1)), int(m.group(2))
            words = [w for w in line.split() if w.endswith(('.cpp', '.cc', '.cu'))]
            name = (words[-1] if words else line.split()[-1]).rsplit('/', 1)[-1]
            now = self.clock()
            kind = 'cu' if name.endswith('.cu') else 'cxx'
            self.done[kind] += 1
            self.spent[kind] += now - self.last
            self.last = now
            el = now - self.t0
            return f'  mmcv build [{k}/{n}] {name:<32} {mmss(el)} elapsed, {self.tail(k, n, el)}'
        if BAD.search(line):
            return line.rstrip('\n')
        return None


def main():
    p = Progress(int(os.environ.get('MAX_JOBS', '2') or 2),
                 int(os.environ.get('PALE_MM_CUDA_FILES', '0') or 0))
    for line in sys.stdin:
        out = p.line(line)
        if out is not None:
            print(out, flush=True)


if __name__ == '__main__':
    main()
