import os,sys,time,subprocess
# per-thread CPU of the worker and ingester processes over a window: name, nice, cpu seconds
def pids():
    out={}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            c=open(f'/proc/{p}/cmdline').read().split('\0')
            if c[0].endswith('aegis-webhook') and len(c)>1 and c[1] in ('worker','ingester'): out[c[1]]=p
        except Exception: pass
    return out
def snap(pid):
    d={}
    for t in os.listdir(f'/proc/{pid}/task'):
        try:
            s=open(f'/proc/{pid}/task/{t}/stat').read()
            name=s[s.index('(')+1:s.rindex(')')]; f=s[s.rindex(')')+2:].split()
            d[t]=(name,int(f[16]),int(f[11])+int(f[12]))
        except Exception: pass
    return d
while True:
    ps=pids()
    if len(ps)==2: break
    time.sleep(0.2)
time.sleep(float(sys.argv[1]))
a={k:snap(v) for k,v in ps.items()}
time.sleep(float(sys.argv[2]))
b={k:snap(v) for k,v in ps.items()}
hz=os.sysconf('SC_CLK_TCK')
for k in ps:
    agg={}
    for t,(name,nice,cpu) in b[k].items():
        d=cpu-a[k].get(t,(name,nice,cpu))[2]
        key=(name,nice); agg[key]=agg.get(key,0)+d
    tot=sum(agg.values())
    print(k, 'total %.2f cores'%(tot/hz/float(sys.argv[2])))
    for (name,nice),v in sorted(agg.items(),key=lambda x:-x[1])[:10]:
        print('   %-20s nice %3d  %.2f cores'%(name,nice,v/hz/float(sys.argv[2])))
