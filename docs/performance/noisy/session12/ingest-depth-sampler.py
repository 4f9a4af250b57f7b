import pika,subprocess,time,sys,re
# find the newest bench ingest queue
deadline=time.time()+60; name=None
seen=set(l.split()[0] for l in subprocess.run(['rabbitmqctl','-q','list_queues','name'],capture_output=True,text=True).stdout.split('\n') if l.strip())
while time.time()<deadline and not name:
    out=subprocess.run(['rabbitmqctl','-q','list_queues','name'],capture_output=True,text=True).stdout
    for l in out.split('\n'):
        l=l.strip()
        if l.endswith('aegis.ingest') and l not in seen: name=l
    time.sleep(0.3)
print('queue',name,flush=True)
c=pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1'));ch=c.channel()
t0=None; rows=[]; end=time.time()+float(sys.argv[1])
bulk=name+'.bulk'
while time.time()<end:
    m=ch.queue_declare(name,passive=True).method.message_count
    try: mb=ch.queue_declare(bulk,passive=True).method.message_count
    except Exception: mb=-1; ch=c.channel()
    if t0 is None and m>0: t0=time.time()
    if t0: rows.append((round(time.time()-t0,3),m,mb))
    time.sleep(0.01)
print(' '.join('%s:%d/%d'%r for r in rows if r[0]<3.0))
