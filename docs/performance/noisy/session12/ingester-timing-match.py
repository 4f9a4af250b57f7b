import json,sys,datetime,re
j,log=sys.argv[1],sys.argv[2]
d=json.load(open(j));b=d['tenants']['tenant_b']
pts=[]
for e in b['slowest']:
    arr=datetime.datetime.fromisoformat(e['arrived'].replace('Z','+00:00')).timestamp()
    pts.append((arr-e['latency_ms']/1000,e['latency_ms']))
t0=min(p for p,_ in pts)
tim={}
for l in open(log):
    m=re.match(r'.*TIMING (\S+) "(\S+)" taken (\S+) started (\S+) done (\S+) held (\d+)',l)
    if m: tim.setdefault(m.group(2),[]).append((datetime.datetime.fromisoformat(m.group(1)).timestamp(),float(m.group(3)),float(m.group(5)),int(m.group(6))))
# B's tenant = the one with ~n entries at 10/s
btenant=min(tim, key=lambda k: abs(len(tim[k])-len(pts)))
bt=sorted(tim[btenant])
import bisect
keys=[x[0] for x in bt]
print('B tenant',btenant,len(bt),'timing lines;',len(pts),'events')
for p,l in sorted(pts,key=lambda x:-x[1])[:12]:
    i=bisect.bisect_left(keys,p-0.005)
    cand=[x for x in bt[max(0,i-2):i+3] if abs(x[0]-p)<0.01]
    c=min(cand,key=lambda x:abs(x[0]-p)) if cand else None
    if c: print('t=%5.2f e2e %6.1f  taken %6.1f  ingest-done %6.1f  after-ingest %6.1f held %d'%(p-t0,l,c[1],c[2],l-c[2],c[3]))
    else: print('t=%5.2f e2e %6.1f  no match'%(p-t0,l))
