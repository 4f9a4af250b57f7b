import json,sys,datetime
for f in sys.argv[1:]:
    d=json.load(open(f));a=d['tenants']['tenant_a'];b=d['tenants']['tenant_b']
    s=b['slowest']
    pts=[]
    for e in s:
        arr=datetime.datetime.fromisoformat(e['arrived'].replace('Z','+00:00')).timestamp()
        pts.append((arr-e['latency_ms']/1000,e['latency_ms']))
    t0=min(p for p,_ in pts)
    sec={}
    for p,l in pts: sec.setdefault(int(p-t0),[]).append(l)
    print(f, 'A %.0f/s'%a['deliveries_per_second'], 'B p50 %.1f p99 %.1f max %.1f n=%d slowest=%d'%(b['latency_ms']['p50'],b['latency_ms']['p99'],b['latency_ms']['max'],b['latency_ms']['samples'],len(s)))
    print('  ', ' '.join('%d:%.0f/%.0f'%(k,sorted(v)[len(v)//2],max(v)) for k,v in sorted(sec.items())))
    print('  over50:', sorted([(round(p-t0,2),round(l)) for p,l in pts if l>50]))
