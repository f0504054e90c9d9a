import grpc, sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel("127.0.0.1:8080"))
try:
    print(stub.Check(health_pb2.HealthCheckRequest(service=" ".join(sys.argv[1:])), timeout=2))
except grpc.RpcError as e:
    print(e.code(), e.details())
