from mcp_servers.erp_demo.serve import main

main()
