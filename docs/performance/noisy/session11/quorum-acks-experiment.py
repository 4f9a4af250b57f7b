import pika, time, sys, threading
mode=sys.argv[1]; N=20000
params=pika.ConnectionParameters('127.0.0.1')
c=pika.BlockingConnection(params); ch=c.channel()
q='ackexp.q'
ch.queue_delete(q)
ch.queue_declare(q, durable=True, arguments={'x-queue-type':'quorum'})
ch.confirm_delivery()
body=b'x'*700
t0=time.time()
# publish with confirms in a separate connection/thread, concurrently with consuming
def pub():
    pc=pika.BlockingConnection(params); pch=pc.channel()
    for i in range(N):
        pch.basic_publish('', q, body, properties=pika.BasicProperties(delivery_mode=2, timestamp=int(time.time()*1e6)))
    pc.close()
th=threading.Thread(target=pub); th.start()
cc=pika.BlockingConnection(params); cch=cc.channel(); cch.basic_qos(prefetch_count=1024)
got=0; lat=[]; pending=0
for method, props, b in cch.consume(q, inactivity_timeout=5):
    if method is None: break
    got+=1; lat.append(time.time()*1e6-props.timestamp)
    if mode=='single': cch.basic_ack(method.delivery_tag)
    else:
        pending+=1
        if pending>=256 or got==N: cch.basic_ack(method.delivery_tag, multiple=True); pending=0
    if got==N: break
t=time.time()-t0
lat.sort()
print(mode, f"{N/t:.0f}/s drain {t:.2f}s lat p50 {lat[len(lat)//2]/1000:.1f} ms p99 {lat[int(len(lat)*.99)]/1000:.1f} ms")
th.join(); c.close()
