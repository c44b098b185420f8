# The optional SASL_SSL listener of deploy/kafka/start (sourced by it; not run on its own).
#
# With KAFKA_SASL_PORT set, the broker opens a second client listener, SASL_SSL (SCRAM-SHA-512 over TLS),
# beside the plaintext one, and turns ACLs on:
#   - TLS: a CA and a broker certificate made once with the JDK's keytool under $KAFKA_DATA_DIR/tls/
#     (PKCS12 keystore and truststore; ca.pem is the CA for Python clients: ssl_cafile / ssl.ca.location).
#   - SCRAM: credentials stored in the KRaft metadata when the folder is formatted (StorageTool --add-scram).
#   - ACLs: StandardAuthorizer; User:admin and User:ANONYMOUS are super users. ANONYMOUS is the principal
#     of the plaintext client, inter-broker and controller listeners, which keep working unrestricted; on
#     the SASL_SSL listener every other user may do only what an ACL allows.
# The passwords are test-only secrets for a local broker, printed at start; never reuse them.
#
# Environment:
#   KAFKA_SASL_PORT            port of the SASL_SSL listener (unset: no listener, no ACLs)
#   KAFKA_SASL_ADMIN_PASSWORD  password of the super user `admin` (admin-secret)
#   KAFKA_SASL_USERS           more users, "name:password ..." (forecaster:forecaster-secret)

sasl_port="${KAFKA_SASL_PORT:-}"
sasl_mechanism="SCRAM-SHA-512"
sasl_admin_password="${KAFKA_SASL_ADMIN_PASSWORD:-admin-secret}"
sasl_users="admin:$sasl_admin_password ${KAFKA_SASL_USERS-forecaster:forecaster-secret}"
tls="$data/tls"

sasl_enabled() { [[ -n "$sasl_port" ]]; }

# The users as the folder was (or is about to be) formatted with: "name:password" per line, sorted.
sasl_user_lines() {
    local user
    for user in $sasl_users; do
        [[ "$user" =~ ^[A-Za-z0-9._-]+:[^]=,[:space:]]+$ ]] \
            || die "KAFKA_SASL_USERS: '$user' is not name:password (no spaces, commas, = or ] in a password)"
        echo "$user"
    done | sort -u
}

# Step S1. Check the settings; a formatted folder keeps the users it was formatted with.
sasl_check() {
    sasl_enabled || return 0
    [[ "$sasl_port" =~ ^[0-9]+$ ]] || die "KAFKA_SASL_PORT=$sasl_port is not a port"
    [[ "$sasl_port" != "$port" && "$sasl_port" != "$controller_port" ]] \
        || die "KAFKA_SASL_PORT must differ from KAFKA_PORT and KAFKA_CONTROLLER_PORT"
    command -v keytool >/dev/null || die "keytool is not installed (it comes with openjdk-17-jre-headless)"
    sasl_user_lines >/dev/null  # dies on a malformed KAFKA_SASL_USERS
    if port_open "$host" "$sasl_port"; then
        die "$host:$sasl_port (SASL_SSL) is taken by another process; set KAFKA_SASL_PORT"
    fi
    if [[ -f "$data/data/meta.properties" && "$(cat "$data/sasl-users" 2>/dev/null)" != "$(sasl_user_lines)" ]]; then
        die "$data was formatted with other SCRAM users (or none); use another KAFKA_DATA_DIR or" \
            "deploy/kafka/stop --wipe"
    fi
}

# Step S2. A CA and a broker certificate signed by it, made once per data folder. The broker's certificate
# names the listen host (and localhost), so clients check the host name as they would in production.
sasl_make_certificates() {
    sasl_enabled || return 0
    [[ -f "$tls/ca.pem" && -f "$tls/broker.p12" && -f "$tls/truststore.p12" ]] && return 0
    say "making a test CA and a broker certificate in $tls (keytool)"
    rm -rf "$tls" "$tls.tmp"
    mkdir -p "$tls.tmp"
    local dir="$tls.tmp" pass san
    pass="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    echo "$pass" > "$dir/store-password"
    if [[ "$host" =~ ^[0-9.]+$ ]]; then san="ip:$host,dns:localhost"; else san="dns:$host,dns:localhost"; fi
    # A short-lived JVM each: C1 only and the serial collector start about three times faster.
    local kt=(keytool -J-XX:TieredStopAtLevel=1 -J-XX:+UseSerialGC -storetype PKCS12 -storepass "$pass")
    local key=(-keyalg EC -groupname secp256r1 -validity 3650)
    {
        "${kt[@]}" -genkeypair -keystore "$dir/ca.p12" -alias ca -dname "CN=forecaster local test CA" \
            "${key[@]}" -ext bc:c=ca:true -ext ku:c=keyCertSign,cRLSign &&
        "${kt[@]}" -exportcert -rfc -keystore "$dir/ca.p12" -alias ca -file "$dir/ca.pem" &&
        "${kt[@]}" -genkeypair -keystore "$dir/broker.p12" -alias broker -dname "CN=$host" "${key[@]}" &&
        "${kt[@]}" -certreq -keystore "$dir/broker.p12" -alias broker -file "$dir/broker.csr" &&
        "${kt[@]}" -gencert -keystore "$dir/ca.p12" -alias ca -infile "$dir/broker.csr" -rfc \
            -outfile "$dir/broker.pem" -validity 3650 -ext "san=$san" -ext eku=serverAuth \
            -ext ku:c=digitalSignature,keyAgreement &&
        "${kt[@]}" -importcert -noprompt -keystore "$dir/broker.p12" -alias ca -file "$dir/ca.pem" &&
        "${kt[@]}" -importcert -keystore "$dir/broker.p12" -alias broker -file "$dir/broker.pem" &&
        "${kt[@]}" -importcert -noprompt -keystore "$dir/truststore.p12" -alias ca -file "$dir/ca.pem"
    } >>"$console" 2>&1 || { tail -n 20 "$console" >&2; die "keytool could not make the certificates"; }
    rm -f "$dir/broker.csr"
    chmod 600 "$dir"/*.p12 "$dir/store-password"
    mv "$dir" "$tls"
}

# Step S3. The listener, TLS, SCRAM and ACL settings, added to server.properties ($1).
sasl_configure() {
    sasl_enabled || return 0
    local props="$1" pass
    pass="$(cat "$tls/store-password")"
    sed -i -e "s|^listeners=.*|&,SASL_SSL://$host:$sasl_port|" \
        -e "s|^advertised.listeners=.*|&,SASL_SSL://$host:$sasl_port|" \
        -e "s|^listener.security.protocol.map=.*|&,SASL_SSL:SASL_SSL|" "$props"
    cat >> "$props" <<EOF

# SASL_SSL listener (KAFKA_SASL_PORT, deploy/kafka/sasl-ssl.sh): SCRAM-SHA-512 over TLS, ACLs on.
sasl.enabled.mechanisms=$sasl_mechanism
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$tls/broker.p12
ssl.keystore.password=$pass
ssl.key.password=$pass
ssl.truststore.type=PKCS12
ssl.truststore.location=$tls/truststore.p12
ssl.truststore.password=$pass
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
# ANONYMOUS: the plaintext client, inter-broker and controller listeners, which must keep working.
super.users=User:admin;User:ANONYMOUS
allow.everyone.if.no.acl.found=false
EOF
}

# Step S4. The StorageTool arguments that store the SCRAM credentials when the folder is formatted.
sasl_format_args() {
    sasl_enabled || return 0
    local user
    while read -r user; do
        echo "--add-scram"
        echo "$sasl_mechanism=[name=${user%%:*},password=${user#*:}]"
    done < <(sasl_user_lines)
}

# Called once the folder is formatted: remembers its users, so a later start can check them (S1).
sasl_formatted() {
    sasl_enabled || return 0
    sasl_user_lines > "$data/sasl-users"
    chmod 600 "$data/sasl-users"
}

# Step S5. Where the CA file is, and the users (test-only secrets), and a client.properties for the JDK
# tools (kafka-console-producer.sh --producer.config ...).
sasl_report() {
    sasl_enabled || return 0
    cat > "$tls/client.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=$sasl_mechanism
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$sasl_admin_password";
ssl.truststore.type=PKCS12
ssl.truststore.location=$tls/truststore.p12
ssl.truststore.password=$(cat "$tls/store-password")
EOF
    say "SASL_SSL ($sasl_mechanism, ACLs on) on $host:$sasl_port; CA file $tls/ca.pem"
    say "users (test-only secrets): $(sasl_user_lines | tr '\n' ' ')(admin is a super user)"
}
