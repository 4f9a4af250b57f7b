import os,time,sys,collections
# sample per-command CPU (utime+stime) every 0.2s for N seconds; print per-interval cores used per command
N=float(sys.argv[1]); iv=0.2; hz=os.sysconf('SC_CLK_TCK')
def snap():
    d=collections.Counter()
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            s=open(f'/proc/{p}/stat').read()
            name=s[s.index('(')+1:s.rindex(')')]
            f=s[s.rindex(')')+2:].split()
            if name.startswith('aegis-webhook'):
                try: name='aw:'+open(f'/proc/{p}/cmdline').read().split('\0')[1]
                except: pass
            d[name[:14]]+=int(f[11])+int(f[12])
        except Exception: pass
    return d
prev=snap(); t0=time.time(); rows=[]
while time.time()-t0<N:
    time.sleep(iv); cur=snap()
    diff={k:(cur[k]-prev.get(k,0))/hz/iv for k in cur if cur[k]-prev.get(k,0)>0}
    rows.append((round(time.time()-t0,1),diff)); prev=cur
keys=collections.Counter()
for _,d in rows:
    for k,v in d.items(): keys[k]+=v
top=[k for k,_ in keys.most_common(8)]
if "aw:ingester" not in top: top.append("aw:ingester")
print('t    '+' '.join('%14s'%k for k in top))
for t,d in rows:
    if sum(d.values())>0.3: print('%4.1f '%t+' '.join('%14.2f'%d.get(k,0) for k in top))
