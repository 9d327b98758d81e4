#!/usr/bin/env python3
"""The import graph of a Rust crate's top-level modules, from its `crate::` paths: prints the
cycles (strongly connected components of more than one module) and which modules import `state`.

Usage: scripts/import-graph.py supervisor-core/src
Exits 1 when there is a cycle: `scripts/test.sh` runs it on every crate, because a layer that
imports one above it is how the app state leaks downwards.
Test modules (after `#[cfg(test)]`) are left out: what they import is not a layer's dependency.
"""
import os,re,sys,itertools
root=sys.argv[1]
mods={}
for dp,dn,fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f); rel=os.path.relpath(p,root)
        top=rel.split('/')[0].replace('.rs','')
        if top in('lib','main'): continue
        src=open(p).read()
        # skip test modules roughly
        src=src.split('#[cfg(test)]')[0]
        # Paths named in comments are not imports.
        src='\n'.join(l for l in src.split('\n') if not l.lstrip().startswith('//'))
        deps=set(re.findall(r'crate::([a-z_]+)',src))
        mods.setdefault(top,set()).update(d for d in deps if d!=top)
# find cycles via SCC (Tarjan)
idx={};low={};st=[];on=set();sccs=[];i=[0]
def sc(v):
    idx[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
    for w in mods.get(v,()):
        if w not in mods: continue
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        c=[]
        while True:
            w=st.pop();on.discard(w);c.append(w)
            if w==v:break
        if len(c)>1: sccs.append(c)
sys.setrecursionlimit(10000)
for v in list(mods):
    if v not in idx: sc(v)
print("modules:",len(mods),"cycles:",sccs)
for m in sorted(mods):
    if 'state' in mods[m]: print("imports state:",m)
sys.exit(1 if sccs else 0)
