import streamlit as st
st.title("Dashboard")
