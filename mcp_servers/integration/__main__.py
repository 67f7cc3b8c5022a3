"""python -m mcp_servers.integration --openapi URL|FILE --allow OPERATION_ID ... --api-key-env VAR --port N"""

from mcp_servers.integration.server import main

main()
