from services.provision.app import main

main()
